"""Find foldable (layer, BatchNorm) pairs in any model and rewrite them.

`torch.fx.symbolic_trace` gives the data flow, which is what makes a fold safe: the producer's
output must go to the BN and nowhere else. A module FX cannot trace (data-dependent control
flow) is not given up on: each of its children is traced on its own, and inside an
`nn.Sequential` consecutive children are folded by position, where the data flow is known.

The fallback assumes what every module tree written for `forward` assumes: a traced child's
submodules are used through that child's `forward`, not reached into by an untraceable parent.

Linear + BatchNorm1d is folded on the features axis; on 3-D activations `(N, L, C)` a BN1d
over `L` with `L == C` cannot be told apart without example inputs (FX sees no shapes).

Module pairs are rewritten in the module tree (the layer replaced by its folded copy, the BN
by `nn.Identity`), so the result keeps the input's class and attributes. Only a functional
`F.batch_norm` call needs its `forward` rewritten; a module holding one comes back as a
`torch.fx.GraphModule`.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.errors import BnfoldError
from bnfold.modules import PASSTHROUGH, Folder, FoldSkipped, check_running_stats, is_batchnorm, merge_folders
from bnfold.report import FoldReport

__all__ = ["fold", "count_batchnorm"]

_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm)


def count_batchnorm(model: nn.Module) -> int:
    """BatchNorm modules of any kind (1d/2d/3d, Sync, Lazy) left in `model`."""
    return sum(1 for m in model.modules() if is_batchnorm(m))


def fold(model: nn.Module, *, inplace: bool = False,
         folders: Mapping[tuple[type, type], Folder | None] | None = None) -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode BatchNorm of `model` into its neighbouring Conv/ConvTranspose/Linear.

    Returns `(folded, report)`. `folded` is in eval mode; it is `model` itself when `inplace`,
    otherwise a deep copy (and `model` is not modified). It has the input's class unless a
    functional `F.batch_norm` was folded, which needs a `torch.fx.GraphModule`: when that is
    `model`'s own forward, `folded` is a new GraphModule even with `inplace`, and `model` keeps
    the layers its forward still normalizes. `folders`
    extends or overrides `bnfold.modules.DEFAULT_FOLDERS` (a value of None removes a pattern).
    Every BatchNorm left in place is listed in `report.skipped` with the reason.
    """
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"bnfold.fold expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise BnfoldError("bnfold.fold cannot rewrite a TorchScript module; fold the eager model before scripting")
    root = model if inplace else copy.deepcopy(model)
    root.eval()
    folder = _Folder(root, merge_folders(folders))
    result = folder.fold_module(root, "")
    folder.report_leftovers(result)
    return result.eval(), folder.report


@dataclass
class _Stats:
    """The tensors of a functional `F.batch_norm` call, shaped like a BN module for the folders."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _describe(node: Any, scope: nn.Module, prefix: str = "") -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{_join(prefix, node.target)} ({type(scope.get_submodule(node.target)).__name__})"
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "placeholder":
        return f"the input {node.target!r}"
    return node.name


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class _Tracer(fx.Tracer):
    """FX's tracer, keeping every type of the folder table whole (a user's Conv2d subclass
    would otherwise be traced through to a functional conv2d and could not be folded)."""

    def __init__(self, leaf_types: frozenset[type]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in self.leaf_types or super().is_leaf_module(m, module_qualified_name)


class _Folder:
    """One fold: the table, the report, and which modules/parameters are shared."""

    def __init__(self, root: nn.Module, table: dict[tuple[type, type], Folder]) -> None:
        self.table = table
        self.leaf_types = frozenset(t for pair in table for t in pair)
        self.report = FoldReport()
        self.handled: set[str] = set()
        paths = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        params = Counter(id(p) for _, p in root.named_parameters(remove_duplicate=False))
        self.shared_modules = {k for k, n in paths.items() if n > 1}
        self.shared_params = {k for k, n in params.items() if n > 1}

    # -- bookkeeping -----------------------------------------------------------------------

    def folded(self, layer: str, bn: str) -> None:
        self.report.folded.append((layer, bn))
        self.handled.add(bn)

    def skipped(self, bn: str, reason: str) -> None:
        if bn not in self.handled:
            self.report.skipped.append((bn, reason))
            self.handled.add(bn)

    def report_leftovers(self, root: nn.Module) -> None:
        for name, module in root.named_modules():
            if is_batchnorm(module) and name not in self.handled:
                self.skipped(name, "never called in the traced forward")

    def _shared(self, module: nn.Module) -> str | None:
        if id(module) in self.shared_modules:
            return "the same module object appears at several places in the model"
        if any(id(p) in self.shared_params for p in module.parameters(recurse=False)):
            return "its parameters are shared (tied) with another module"
        return None

    def _guard_pair(self, layer: nn.Module, bn: nn.Module) -> None:
        for what, module in (("layer", layer), ("BatchNorm", bn)):
            why = self._shared(module)
            if why:
                raise FoldSkipped(f"the {what} cannot be changed alone: {why}")

    def _apply(self, scope: nn.Module, prefix: str, first: str, second: str, key: tuple[type, type],
               layer_path: str, bn_path: str) -> None:
        """Fold the pair of submodules `first`, `second` of `scope` (data-flow order)."""
        a, b = scope.get_submodule(first), scope.get_submodule(second)
        layer, bn = (b, a) if is_batchnorm(a) else (a, b)
        self._guard_pair(layer, bn)
        new_layer = self.table[key](a, b)
        _set_submodule(scope, layer_path, new_layer)
        _set_submodule(scope, bn_path, nn.Identity())
        self.folded(_join(prefix, layer_path), _join(prefix, bn_path))

    def _try_apply(self, reasons: list[str], context: str, scope: nn.Module, prefix: str, first: str,
                   second: str, key: tuple[type, type], layer_path: str, bn_path: str) -> bool:
        """`_apply`; when a guard refuses the pair, its reason goes to `reasons` after `context`."""
        try:
            self._apply(scope, prefix, first, second, key, layer_path, bn_path)
        except FoldSkipped as exc:
            reasons.append(f"{context}{exc}")
            return False
        return True

    # -- traversal -------------------------------------------------------------------------

    def fold_module(self, module: nn.Module, prefix: str) -> nn.Module:
        """Fold inside `module` (named `prefix` in the root); returns it or its GraphModule."""
        try:
            tracer = _Tracer(self.leaf_types)
            graph = tracer.trace(module)
            traced = fx.GraphModule(tracer.root, graph, class_name=type(module).__name__)
        except Exception as exc:  # FX raises many types: TraceError, TypeError, NotImplementedError...
            first_line = (str(exc).strip().splitlines() or [""])[0][:160]
            self.report.notes.append(
                f"FX could not trace {prefix or 'the model'} ({type(exc).__name__}: {first_line}); "
                "folded its children one by one")
            self._walk(module, prefix)
            return module
        return self._fold_graph(module, traced, prefix)

    def _walk(self, module: nn.Module, prefix: str) -> None:
        """The fallback for an untraceable module: Sequential pairs, then each child on its own."""
        if isinstance(module, nn.Sequential):
            self._walk_sequential(module, prefix)
        for name, child in list(module.named_children()):
            path = _join(prefix, name)
            if is_batchnorm(child):
                try:
                    check_running_stats(child)
                except FoldSkipped as exc:
                    self.skipped(path, str(exc))
                    continue
                self.skipped(path, f"{prefix or 'the model'} cannot be traced by FX and this BatchNorm is "
                                   "not next to a layer inside an nn.Sequential, so its producer is unknown")
            elif any(True for _ in child.children()):
                new = self.fold_module(child, path)
                if new is not child:
                    setattr(module, name, new)

    def _walk_sequential(self, seq: nn.Sequential, prefix: str) -> None:
        names = list(seq._modules)
        for i, name in enumerate(names):
            if not is_batchnorm(seq._modules[name]):
                continue
            reasons = []
            for step in (-1, 1):  # the layer before the BN, then the layer after it
                j = i + step
                while 0 <= j < len(names) and type(seq._modules[names[j]]) in PASSTHROUGH:
                    j += step
                if not 0 <= j < len(names):
                    continue
                first, second = (names[j], name) if step < 0 else (name, names[j])  # data-flow order
                key = (type(seq._modules[first]), type(seq._modules[second]))
                if key not in self.table:
                    continue
                if self._try_apply(reasons, "", seq, prefix, first, second, key, names[j], name):
                    break
            else:
                self.skipped(_join(prefix, name), "; ".join(reasons) or
                             "no foldable layer right before or after it in its nn.Sequential")

    # -- FX graph --------------------------------------------------------------------------

    def _fold_graph(self, module: nn.Module, traced: fx.GraphModule, prefix: str) -> nn.Module:
        graph = traced.graph
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        # Layers folded with an F.batch_norm go into the GraphModule only: `module` still runs its
        # own forward (with the F.batch_norm), so it must keep the unfolded layer.
        folded_layers: dict[str, nn.Module] = {}
        for node in list(graph.nodes):
            if node.op == "call_module" and is_batchnorm(module.get_submodule(node.target)):
                self._fold_bn_node(module, node, calls, prefix)
            elif node.op == "call_function" and node.target in _FUNCTIONAL_BN:
                self._fold_functional(module, node, calls, prefix, folded_layers)
        if not folded_layers:
            return module
        graph.eliminate_dead_code()
        result = fx.GraphModule(module, graph, class_name=type(module).__name__)
        for target, layer in folded_layers.items():
            _set_submodule(result, target, layer)
        self.report.notes.append(f"{prefix or 'the model'} became a torch.fx.GraphModule: folding "
                                 "F.batch_norm calls rewrote its forward")
        return result

    def _skip_passthrough_back(self, module: nn.Module, node: Any) -> Any:
        while (isinstance(node, fx.Node) and node.op == "call_module"
               and type(module.get_submodule(node.target)) in PASSTHROUGH and node.args):
            node = node.args[0]
        return node

    def _fold_bn_node(self, module: nn.Module, node: fx.Node, calls: Counter, prefix: str) -> None:
        bn_path = node.target
        name = _join(prefix, bn_path)
        bn = module.get_submodule(bn_path)
        if calls[bn_path] > 1:
            self.skipped(name, f"called {calls[bn_path]} times in forward; folding it into one producer "
                               "would change the other calls")
            return
        try:
            check_running_stats(bn)
        except FoldSkipped as exc:
            self.skipped(name, str(exc))
            return
        reasons: list[str] = []
        if self._try_after(module, node, bn, calls, prefix, reasons):
            return
        if self._try_before(module, node, bn, calls, prefix, reasons):
            return
        self.skipped(name, "; ".join(reasons))

    def _chain_has_one_user(self, start: fx.Node, last: fx.Node, scope: nn.Module, prefix: str) -> str | None:
        """None when every node from `start` to `last` (the BN's input) feeds only the next one."""
        node = last
        while True:
            if len(node.users) != 1:
                others = [_describe(u, scope, prefix) for u in node.users]
                return f"the output of {_describe(node, scope, prefix)} has {len(node.users)} users ({', '.join(others)})"
            if node is start:
                return None
            node = node.args[0]

    def _producer_problem(self, producer: fx.Node, last: fx.Node, scope: nn.Module, calls: Counter,
                          prefix: str) -> str | None:
        """Why the BN fed by `last` cannot be folded into `producer`, or None when it can."""
        why = self._chain_has_one_user(producer, last, scope, prefix)
        if why is None and calls[producer.target] > 1:
            why = f"{_join(prefix, producer.target)} is called {calls[producer.target]} times in forward"
        return why

    def _try_after(self, module: nn.Module, node: fx.Node, bn: nn.Module, calls: Counter, prefix: str,
                   reasons: list[str]) -> bool:
        producer = self._skip_passthrough_back(module, node.args[0] if node.args else None)
        if not (isinstance(producer, fx.Node) and producer.op == "call_module"):
            reasons.append(f"its input comes from {_describe(producer, module, prefix)}, not a layer module")
            return False
        layer = module.get_submodule(producer.target)
        key = (type(layer), type(bn))
        if key not in self.table:
            reasons.append(f"no folder for {type(layer).__name__} -> {type(bn).__name__} (after {_join(prefix, producer.target)})")
            return False
        why = self._producer_problem(producer, node.args[0], module, calls, prefix)
        if why:
            reasons.append(f"not folded into {_join(prefix, producer.target)}: {why}")
            return False
        return self._try_apply(reasons, f"not folded into {_join(prefix, producer.target)}: ", module, prefix,
                               producer.target, node.target, key, producer.target, node.target)

    def _try_before(self, module: nn.Module, node: fx.Node, bn: nn.Module, calls: Counter, prefix: str,
                    reasons: list[str]) -> bool:
        current = node
        while True:
            if len(current.users) != 1:
                if current is node and not reasons:
                    reasons.append(f"its output has {len(current.users)} users")
                return False
            (user,) = current.users
            if user.op != "call_module" or user.args[:1] != (current,):
                return False
            target = module.get_submodule(user.target)
            if type(target) in PASSTHROUGH:
                current = user
                continue
            break
        key = (type(bn), type(target))
        if key not in self.table:
            return False
        if calls[user.target] > 1:
            reasons.append(f"not folded into the following {_join(prefix, user.target)}: it is called "
                           f"{calls[user.target]} times in forward")
            return False
        return self._try_apply(reasons, f"not folded into the following {_join(prefix, user.target)}: ", module,
                               prefix, node.target, user.target, key, user.target, node.target)

    def _fold_functional(self, module: nn.Module, node: fx.Node, calls: Counter, prefix: str,
                         folded_layers: dict[str, nn.Module]) -> None:
        """Fold one F.batch_norm call into its producer: the folded layer goes into `folded_layers`
        under its path, the call is removed from the graph; a skip is reported."""
        name = _join(prefix, f"{node.name} (F.batch_norm)")
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        if node.target is torch.batch_norm:
            names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                     "eps", "cudnn_enabled")
        args = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
        if args.get("training") is not False:
            self.skipped(name, f"training={args.get('training')!r}: it normalizes with batch statistics")
            return
        tensors: dict[str, torch.Tensor | None] = {}
        for key in ("running_mean", "running_var", "weight", "bias"):
            value = args.get(key)
            if value is None:
                tensors[key] = None
            elif isinstance(value, fx.Node) and value.op == "get_attr":
                tensors[key] = _get_attr(module, value.target)
            else:
                self.skipped(name, f"its {key} is computed in forward ({_describe(value, module, prefix)}), "
                                   "not a module buffer or parameter")
                return
        stats = _Stats(tensors["running_mean"], tensors["running_var"], tensors["weight"], tensors["bias"],
                       float(args["eps"]))
        producer = self._skip_passthrough_back(module, args["input"])
        if not (isinstance(producer, fx.Node) and producer.op == "call_module"):
            self.skipped(name, f"its input comes from {_describe(producer, module, prefix)}, not a layer module")
            return
        layer = module.get_submodule(producer.target)
        fn = next((f for (a, b), f in self.table.items() if a is type(layer) and _is_batchnorm_type(b)), None)
        try:
            if fn is None:
                raise FoldSkipped(f"no folder for {type(layer).__name__} followed by a BatchNorm")
            why = self._producer_problem(producer, args["input"], module, calls, prefix) or self._shared(layer)
            if why:
                raise FoldSkipped(why)
            new_layer = fn(layer, stats)
        except FoldSkipped as exc:
            self.skipped(name, f"not folded into {_join(prefix, producer.target)}: {exc}")
            return
        folded_layers[producer.target] = new_layer
        node.replace_all_uses_with(args["input"])
        node.graph.erase_node(node)
        self.folded(_join(prefix, producer.target), name)


def _is_batchnorm_type(cls: type) -> bool:
    return issubclass(cls, nn.modules.batchnorm._BatchNorm)


def _get_attr(module: nn.Module, target: str) -> torch.Tensor:
    owner_path, _, attr = target.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return getattr(owner, attr)
