"""Find foldable (layer, BatchNorm) pairs in any model and rewrite them.

`torch.fx.symbolic_trace` gives the data flow, which is what makes a fold safe: the producer's
output must go to the BN and nowhere else. A module FX cannot trace (data-dependent control
flow) is not given up on: each of its children is traced on its own, and inside an
`nn.Sequential` consecutive children are folded by position, where the data flow is known.

The fallback assumes what every module tree written for `forward` assumes: a traced child's
submodules are used through that child's `forward`, not reached into by an untraceable parent.

BatchNorm-like modules (torch's, frozen, timm's BN + activation, a user's own class) are read
through `bnfold.adapters` and traced as leaves, as are layers a fold function can take. Reads of
a tensor's shape, rank, dtype or device are not counted as second consumers. Between a layer and
its BN the fold looks through eval-mode identities (Dropout, Identity), average pools that
commute with a per-channel map (convs only) and `flatten(0, 1)` (Linear only); a BN after the
`torch.cat` of convs along channels is split between them.

Linear + BatchNorm1d is folded on the features axis; on 3-D activations `(N, L, C)` a BN1d
over `L` with `L == C` cannot be told apart without example inputs (FX sees no shapes).

Module pairs are rewritten in the module tree (the layer replaced by its folded copy, the BN
by `nn.Identity`, or by what of it still runs: timm's activation), so the result keeps the
input's class and attributes. Only a functional
`F.batch_norm` call needs its `forward` rewritten; a module holding one comes back as a
`torch.fx.GraphModule`.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from bnfold.adapters import Adapter, BatchNormReader, BNStats, affine_candidate
from bnfold.errors import BnfoldError, FoldSkipped, first_line
from bnfold.patterns import PASSTHROUGH, FoldFn, check_hooks, find_fold_fn, layer_kind, merge_folders
from bnfold.fold_report import FoldReport
from bnfold.parity import float_parameter

__all__ = ["fold", "count_batchnorm", "record_inputs"]

_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm)


ExampleInputs = Union[torch.Tensor, tuple, list]


def count_batchnorm(model: nn.Module, *, batchnorms: Mapping[type, Adapter] | None = None,
                    example_inputs: ExampleInputs | None = None) -> int:
    """BatchNorm-like modules left in `model`: torch's (1d/2d/3d, Sync, Lazy), frozen ones, timm's
    BN + activation, any class with running statistics or that looks like a normalization, and
    (given `example_inputs`) any module of the caller's computing a per-channel affine map on the
    input the model feeds it (see `bnfold.adapters`)."""
    inputs, _ = record_inputs(model, example_inputs)
    reader = BatchNormReader(batchnorms, inputs)
    return sum(1 for m in model.modules() if reader.is_batchnorm(m))


def _as_args(example_inputs: ExampleInputs, model: nn.Module) -> tuple:
    """The example inputs as call arguments, floating ones in the model's dtype and on its device."""
    param = float_parameter(model)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if param is None:
        return args
    return tuple(a.to(device=param.device, dtype=param.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


def record_inputs(model: nn.Module, example_inputs: ExampleInputs | None) -> tuple[dict[int, torch.Tensor], str | None]:
    """The input each module of the caller's that might be a per-channel map (`affine_candidate`)
    receives when `model` runs on `example_inputs` in eval mode under `no_grad`, by `id(module)`
    (its first call), and a note when the model could not run. The model runs only when it has
    such a module: torch's and known third-party BatchNorms need no input to be read."""
    if example_inputs is None:
        return {}, None
    candidates = [m for m in model.modules() if affine_candidate(m)]
    if not candidates:
        return {}, None
    seen: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        if id(module) not in seen and args and isinstance(args[0], torch.Tensor):
            seen[id(module)] = args[0].detach().clone()

    handles = [m.register_forward_pre_hook(hook) for m in candidates]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*_as_args(example_inputs, model))
    except Exception as exc:  # noqa: BLE001 - the caller's model on the caller's inputs
        return seen, (f"the model failed on the example inputs ({first_line(exc, with_type=True, limit=160)}); "
                      "modules of its own were judged by their attributes only")
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    return seen, None


def fold(model: nn.Module, *, inplace: bool = False,
         folders: Mapping[tuple[type, type], FoldFn | None] | None = None,
         batchnorms: Mapping[type, Adapter] | None = None,
         example_inputs: ExampleInputs | None = None) -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode BatchNorm of `model` into its neighbouring Conv/ConvTranspose/Linear.

    Returns `(folded, report)`. `folded` is in eval mode; it is `model` itself when `inplace`,
    otherwise a deep copy (and `model` is not modified). It has the input's class unless a
    functional `F.batch_norm` was folded, which needs a `torch.fx.GraphModule`: when that is
    `model`'s own forward, `folded` is a new GraphModule even with `inplace`, and `model` keeps
    the layers its forward still normalizes. `folders`
    extends or overrides `bnfold.patterns.DEFAULT_FOLDERS` (a value of None removes a pattern).
    `batchnorms` maps a BatchNorm-like class of the caller's to an adapter `module -> BNStats`
    (`bnfold.adapters`); torch's, torchvision's and timm's BatchNorms are built in, and other
    classes with running statistics are folded once a float64 probe shows they compute a BatchNorm.
    `example_inputs` (a tensor, or a tuple of the forward's arguments) lets modules of the caller's
    be recognized by what they do: the model runs on them once, each such module's input is
    recorded, and a module that computes a per-channel affine map on it is folded whatever its
    attributes are called. Every BatchNorm-like module left in place, and every module that looks
    like a normalization, is listed once in `report.skipped` with the reason.
    """
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"bnfold.fold expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise BnfoldError("bnfold.fold cannot rewrite a TorchScript module; fold the eager model before scripting")
    root = model if inplace else copy.deepcopy(model)
    root.eval()
    inputs, problem = record_inputs(root, example_inputs)
    reader = BatchNormReader(batchnorms, inputs)
    for module in root.modules():
        # Probe now: FX's tracer patches torch functions while it traces, and asks which modules are
        # BatchNorms (leaves) from inside; a probe run there would fail on its patched calls.
        reader.is_batchnorm(module)
    fold_pass = _FoldPass(root, merge_folders(folders), reader)
    if problem:
        fold_pass.report.notes.append(problem)
    result = fold_pass.fold_module(root, "")
    fold_pass.report_leftovers(result)
    return result.eval(), fold_pass.report


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
    """FX's tracer, keeping whole every layer a fold function can take (a Conv2d subclass that
    keeps Conv2d's forward, a "same"-padding wrapper whose padding arithmetic FX cannot trace) and
    every BatchNorm-like module (timm's BatchNormAct2d would otherwise dissolve into an
    F.batch_norm behind a shape assert)."""

    def __init__(self, leaf_types: frozenset[type], reader: BatchNormReader,
                 opaque: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.reader = reader
        self.opaque = opaque  # ids of children FX cannot trace: kept whole, folded on their own

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (id(m) in self.opaque or type(m) in self.leaf_types or layer_kind(m) is not None
                or self.reader.is_leaf(m) or super().is_leaf_module(m, module_qualified_name))


# Reads of a tensor that never touch its values: a BN folded into the tensor's producer changes
# none of them (shape, rank, dtype and device stay), so they are not second consumers.
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_META_METHODS = frozenset({"size", "dim"})
_SHAPE_FROM_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})  # x.reshape_as(node): node's shape


def _reads_only_metadata(user: fx.Node, node: fx.Node) -> bool:
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _META_ATTRS
    if user.op == "call_method" and user.target in _META_METHODS:
        return user.args[0] is node
    if user.op == "call_method" and user.target in _SHAPE_FROM_METHODS:
        return user.args[0] is not node and len(user.args) == 2 and user.args[1] is node
    return False


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _reads_only_metadata(u, node)]


_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _commutes_with_affine(m: nn.Module) -> bool:
    """An average pool whose window weights sum to one everywhere (no padding, no partial
    windows, no divisor override): it commutes with a per-channel affine map."""
    if isinstance(m, _ADAPTIVE_AVG_POOLS):
        return True
    if not isinstance(m, _AVG_POOLS) or m.ceil_mode or getattr(m, "divisor_override", None) is not None:
        return False
    padding = m.padding if isinstance(m.padding, tuple) else (m.padding,)
    return all(p == 0 for p in padding)


def _is_flatten01(node: fx.Node) -> bool:
    """`x.flatten(0, 1)`: merges the two leading axes and keeps the last one (levit's LinearNorm)."""
    if node.op == "call_method" and node.target == "flatten":
        args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim") if k in node.kwargs]
    elif node.op == "call_function" and node.target is torch.flatten:
        args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim") if k in node.kwargs]
    else:
        return False
    return args == [0, 1]


# What sits between a layer and its BN without changing the fold: "identity" (Dropout, Identity:
# the identity in eval mode), "pool" (an average pool that commutes with a per-channel map; channel
# axis 1, so only for convs), "flatten" (flatten(0, 1): keeps the last axis, so only for Linear).
_LAYOUT_OK = {"identity": (nn.Module,), "pool": (_ConvNd,), "flatten": (nn.Linear,)}


class _FoldPass:
    """One fold: the pattern table, the BatchNorm reader, the report, and which modules and
    parameters are shared."""

    def __init__(self, root: nn.Module, table: dict[tuple[type, type], FoldFn], reader: BatchNormReader) -> None:
        self.table = table
        self.reader = reader
        self.leaf_types = frozenset(t for pair in table for t in pair)
        self.root = root
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
            self.handled.add(bn)
            try:
                module = self.root.get_submodule(bn)
            except AttributeError:  # a functional call's name
                module = None
            if module is not None and self.reader.quiet(module):
                # A per-channel map of the caller's that is no normalization: worth a word, but not
                # a BatchNorm left behind.
                self.report.notes.append(f"{bn} ({type(module).__name__}) computes a per-channel affine map "
                                         f"but was not folded: {reason}")
                return
            self.report.skipped.append((bn, reason))

    def report_leftovers(self, root: nn.Module) -> None:
        """Every BatchNorm-like module still in `root` and not reported yet gets its entry."""
        for name, module in root.named_modules():
            # A module whose own F.batch_norm was reported is reported under that name already.
            inner = any(h.startswith(f"{name} (") for h in self.handled)
            if name not in self.handled and not inner and self.reader.is_batchnorm(module):
                self.skipped(name, "never called in the traced forward")

    def _shared(self, module: nn.Module) -> str | None:
        if id(module) in self.shared_modules:
            return "the same module object appears at several places in the model"
        if any(id(p) in self.shared_params for p in module.parameters(recurse=False)):
            return "its parameters are shared (tied) with another module"
        return None

    def _fold_pair(self, scope: nn.Module, layer_path: str, bn_path: str, stats: BNStats, fn: FoldFn, *,
                   bn_first: bool) -> nn.Module:
        """The folded copy of `scope`'s layer at `layer_path`, after the guards on both modules."""
        layer, bn = scope.get_submodule(layer_path), scope.get_submodule(bn_path)
        for what, module in (("layer", layer), ("BatchNorm", bn)):
            why = self._shared(module)
            if why:
                raise FoldSkipped(f"the {what} cannot be changed alone: {why}")
        check_hooks(bn)
        return fn(stats, layer) if bn_first else fn(layer, stats)

    def _rewrite(self, scope: nn.Module, prefix: str, bn_path: str, stats: BNStats,
                 new_layers: dict[str, nn.Module]) -> None:
        """Put the folded layers in place and the BN's remainder (its activation, or nothing) in its."""
        for path, layer in new_layers.items():
            _set_submodule(scope, path, layer)
        _set_submodule(scope, bn_path, stats.tail if stats.tail is not None else nn.Identity())
        self.folded(", ".join(_join(prefix, p) for p in new_layers), _join(prefix, bn_path))

    def _try_pair(self, reasons: list[str], context: str, scope: nn.Module, prefix: str, layer_path: str,
                  bn_path: str, stats: BNStats, fn: FoldFn, *, bn_first: bool) -> bool:
        """Fold and rewrite one pair; when a guard refuses it, its reason goes to `reasons` after `context`."""
        try:
            new = self._fold_pair(scope, layer_path, bn_path, stats, fn, bn_first=bn_first)
        except FoldSkipped as exc:
            reasons.append(f"{context}{exc}")
            return False
        self._rewrite(scope, prefix, bn_path, stats, {layer_path: new})
        return True

    # -- traversal -------------------------------------------------------------------------

    def _trace(self, module: nn.Module, opaque: frozenset[int] = frozenset()) -> fx.GraphModule:
        tracer = _Tracer(self.leaf_types, self.reader, opaque)
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph, class_name=type(module).__name__)

    def _untraceable_children(self, module: nn.Module) -> dict[str, nn.Module]:
        found = {}
        for name, child in module.named_children():
            if any(True for _ in child.children()) and not self.reader.is_leaf(child):
                try:
                    self._trace(child)
                except Exception:  # see fold_module
                    found[name] = child
        return found

    def fold_module(self, module: nn.Module, prefix: str) -> nn.Module:
        """Fold inside `module` (named `prefix` in the root); returns it or its GraphModule.

        When FX cannot trace `module`, the children it cannot trace are kept whole as leaves and
        `module` is traced again (its own pairs, e.g. `self.conv1` then `self.bn1`, still fold);
        those children are folded on their own. When that fails too, the children are walked."""
        try:
            traced = self._trace(module)
        except Exception as exc:  # FX raises many types: TraceError, TypeError, NotImplementedError...
            why = first_line(exc, with_type=True, limit=200)
            opaque = self._untraceable_children(module)
            try:
                if not opaque:
                    raise
                traced = self._trace(module, frozenset(id(c) for c in opaque.values()))
            except Exception:  # the module's own forward is what FX cannot trace
                self.report.notes.append(f"FX could not trace {prefix or 'the model'} ({why}); "
                                         "folded its children one by one")
                self._walk(module, prefix)
                return module
            self.report.notes.append(
                f"FX could not trace {prefix or 'the model'} ({why}); traced it with "
                f"{', '.join(_join(prefix, n) for n in opaque)} kept whole, and folded those on their own")
            result = self._fold_graph(module, traced, prefix)
            for name, child in opaque.items():
                new = self.fold_module(child, _join(prefix, name))
                if new is not child:
                    _set_submodule(result, name, new)
                    if result is not module:  # the GraphModule and `module` share the child
                        setattr(module, name, new)
            return result
        return self._fold_graph(module, traced, prefix)

    def _walk(self, module: nn.Module, prefix: str) -> None:
        """The fallback for an untraceable module: Sequential pairs, then each child on its own."""
        if isinstance(module, nn.Sequential):
            self._walk_sequential(module, prefix)
        for name, child in list(module.named_children()):
            path = _join(prefix, name)
            if self.reader.is_batchnorm(child):
                try:
                    self.reader.read(child)
                except FoldSkipped as exc:
                    self.skipped(path, str(exc))
                    continue
                self.skipped(path, f"{prefix or 'the model'} cannot be traced by FX and this BatchNorm is "
                                   "not next to a layer inside an nn.Sequential, so its producer is unknown")
            elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers: no forward to trace
                self._walk(child, path)
            elif any(True for _ in child.children()):
                new = self.fold_module(child, path)
                if new is not child:
                    setattr(module, name, new)

    def _walk_sequential(self, seq: nn.Sequential, prefix: str) -> None:
        names = list(seq._modules)
        for i, name in enumerate(names):
            bn = seq._modules[name]
            if not self.reader.is_batchnorm(bn):
                continue
            try:
                stats = self.reader.read(bn)
            except FoldSkipped as exc:
                self.skipped(_join(prefix, name), str(exc))
                continue
            reasons: list[str] = []
            for step in (-1, 1):  # the layer before the BN, then the layer after it
                j = i + step
                while 0 <= j < len(names) and type(seq._modules[names[j]]) in PASSTHROUGH:
                    j += step
                if not 0 <= j < len(names):
                    continue
                fn = find_fold_fn(self.table, seq._modules[names[j]], bn, stats, bn_first=step > 0)
                if fn is None:
                    continue
                if self._try_pair(reasons, "", seq, prefix, names[j], name, stats, fn, bn_first=step > 0):
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
            if node.op == "call_module" and self.reader.is_batchnorm(module.get_submodule(node.target)):
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

    def _is_layer(self, m: nn.Module) -> bool:
        """A module a fold function may take: in the table, or computing as a torch layer."""
        return type(m) in self.leaf_types or layer_kind(m) is not None

    def _passthrough(self, module: nn.Module, node: Any) -> str | None:
        """The kind of `node` when the fold can look through it (see `_LAYOUT_OK`), else None."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_module":
            m = module.get_submodule(node.target)
            if type(m) in PASSTHROUGH:
                return "identity"
            return "pool" if _commutes_with_affine(m) else None
        return "flatten" if _is_flatten01(node) else None

    def _back(self, module: nn.Module, node: Any) -> tuple[Any, list[str]]:
        """The first node before `node` that is not a passthrough, and the kinds passed."""
        kinds: list[str] = []
        while (kind := self._passthrough(module, node)) is not None and node.args:
            kinds.append(kind)
            node = node.args[0]
        return node, kinds

    @staticmethod
    def _layout_problem(layer: nn.Module, kinds: list[str], path: str) -> str | None:
        for kind in kinds:
            if not isinstance(layer, _LAYOUT_OK[kind]):
                what = {"pool": "an average pool", "flatten": "flatten(0, 1)"}[kind]
                return (f"{what} between {path} ({type(layer).__name__}) and the BatchNorm moves the "
                        "channel axis the BatchNorm normalizes away from the layer's channels")
        return None

    def _fold_bn_node(self, module: nn.Module, node: fx.Node, calls: Counter, prefix: str) -> None:
        bn_path = node.target
        name = _join(prefix, bn_path)
        if calls[bn_path] > 1:
            self.skipped(name, f"called {calls[bn_path]} times in forward; folding it into one producer "
                               "would change the other calls")
            return
        try:
            stats = self.reader.read(module.get_submodule(bn_path))
        except FoldSkipped as exc:
            self.skipped(name, str(exc))
            return
        reasons: list[str] = []
        if self._try_after(module, node, stats, calls, prefix, reasons):
            return
        if self._try_before(module, node, stats, calls, prefix, reasons):
            return
        self.skipped(name, "; ".join(reasons))

    def _chain_has_one_user(self, start: fx.Node, last: fx.Node, scope: nn.Module, prefix: str) -> str | None:
        """None when every node from `start` to `last` (the BN's input) feeds only the next one
        (reads of its shape, rank, dtype or device aside)."""
        node = last
        while True:
            users = _value_users(node)
            if len(users) != 1:
                others = [_describe(u, scope, prefix) for u in users]
                return f"the output of {_describe(node, scope, prefix)} has {len(users)} users ({', '.join(others)})"
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

    def _try_after(self, module: nn.Module, node: fx.Node, stats: BNStats, calls: Counter, prefix: str,
                   reasons: list[str]) -> bool:
        bn = module.get_submodule(node.target)
        start = node.args[0] if node.args else None
        producer, kinds = self._back(module, start)
        if (isinstance(producer, fx.Node) and producer.op == "call_function" and producer.target is torch.cat
                and not kinds):
            return self._try_cat(module, node, producer, stats, calls, prefix, reasons)
        if not (isinstance(producer, fx.Node) and producer.op == "call_module") or not self._is_layer(
                module.get_submodule(producer.target)):
            reasons.append(f"its input comes from {_describe(producer, module, prefix)}, not a layer module")
            return False
        layer = module.get_submodule(producer.target)
        path = _join(prefix, producer.target)
        fn = find_fold_fn(self.table, layer, bn, stats, bn_first=False)
        if fn is None:
            reasons.append(f"no fold function for {type(layer).__name__} -> {type(bn).__name__} (after {path})")
            return False
        why = self._layout_problem(layer, kinds, path) or self._producer_problem(producer, start, module, calls, prefix)
        if why:
            reasons.append(f"not folded into {path}: {why}")
            return False
        return self._try_pair(reasons, f"not folded into {path}: ", module, prefix, producer.target, node.target,
                              stats, fn, bn_first=False)

    def _try_cat(self, module: nn.Module, node: fx.Node, cat: fx.Node, stats: BNStats, calls: Counter,
                 prefix: str, reasons: list[str]) -> bool:
        """A BN after `torch.cat([conv_a(..), conv_b(..), ...], 1)` (timm's MixedConv2d): each conv
        takes the BN's channels it produced, when nothing else reads the convs' or the cat's output."""
        parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if dim != 1 or not isinstance(parts, (list, tuple)):
            reasons.append(f"its input comes from a torch.cat over axis {dim!r}, not the channel axis 1")
            return False
        why = self._chain_has_one_user(cat, cat, module, prefix)
        new_layers: dict[str, nn.Module] = {}
        offset = 0
        try:
            if why:
                raise FoldSkipped(why)
            for part in parts:
                producer, kinds = self._back(module, part)
                if kinds or not (isinstance(producer, fx.Node) and producer.op == "call_module"):
                    raise FoldSkipped(f"a concatenated input comes from {_describe(producer, module, prefix)}, "
                                      "not a conv module")
                layer = module.get_submodule(producer.target)
                if not isinstance(layer, _ConvNd) or producer.target in new_layers:
                    raise FoldSkipped(f"a concatenated input comes from {_describe(producer, module, prefix)}, "
                                      "not a conv module used once")
                why = self._producer_problem(producer, part, module, calls, prefix)
                if why:
                    raise FoldSkipped(why)
                channels = layer.out_channels
                part_stats = stats.channels(offset, offset + channels)
                offset += channels
                if part_stats.num_features != channels:
                    raise FoldSkipped(f"shapes disagree: the concatenated layers produce at least {offset} channels, "
                                      f"the BatchNorm normalizes {stats.num_features}")
                fn = find_fold_fn(self.table, layer, module.get_submodule(node.target), part_stats, bn_first=False)
                if fn is None:
                    raise FoldSkipped(f"no fold function for {type(layer).__name__} (at {producer.target})")
                new_layers[producer.target] = self._fold_pair(module, producer.target, node.target, part_stats, fn,
                                                              bn_first=False)
            if offset != stats.num_features:
                raise FoldSkipped(f"shapes disagree: the concatenated layers produce {offset} channels, "
                                  f"the BatchNorm normalizes {stats.num_features}")
        except FoldSkipped as exc:
            reasons.append(f"not folded into the concatenated layers: {exc}")
            return False
        self._rewrite(module, prefix, node.target, stats, new_layers)
        return True

    def _try_before(self, module: nn.Module, node: fx.Node, stats: BNStats, calls: Counter, prefix: str,
                    reasons: list[str]) -> bool:
        bn = module.get_submodule(node.target)
        current, kinds = node, []
        while True:
            users = _value_users(current)
            if len(users) != 1:
                if current is node and not reasons:
                    reasons.append(f"its output has {len(users)} users")
                return False
            (user,) = users
            if user.args[:1] != (current,):
                return False
            kind = self._passthrough(module, user)
            if kind is not None:
                kinds.append(kind)
                current = user
                continue
            if user.op != "call_module":
                return False
            break
        target = module.get_submodule(user.target)
        path = _join(prefix, user.target)
        fn = find_fold_fn(self.table, target, bn, stats, bn_first=True)
        if fn is None:
            return False
        why = self._layout_problem(target, kinds, path)
        if why is None and calls[user.target] > 1:
            why = f"it is called {calls[user.target]} times in forward"
        if why:
            reasons.append(f"not folded into the following {path}: {why}")
            return False
        return self._try_pair(reasons, f"not folded into the following {path}: ", module, prefix, user.target,
                              node.target, stats, fn, bn_first=True)

    def _fold_functional(self, module: nn.Module, node: fx.Node, calls: Counter, prefix: str,
                         folded_layers: dict[str, nn.Module]) -> None:
        """Fold one F.batch_norm call into its producer: the folded layer goes into `folded_layers`
        under its path, the call is removed from the graph; a skip is reported."""
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
        if node.target is torch.batch_norm:
            names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                     "eps", "cudnn_enabled")
        args = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
        name = self._functional_name(args, node, prefix)
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
        if tensors["running_mean"] is None or tensors["running_var"] is None:
            self.skipped(name, "it has no running statistics: it normalizes with batch statistics")
            return
        stats = BNStats(tensors["running_mean"], tensors["running_var"], float(args["eps"]), tensors["weight"],
                        tensors["bias"])
        producer, kinds = self._back(module, args["input"])
        if not (isinstance(producer, fx.Node) and producer.op == "call_module"):
            self.skipped(name, f"its input comes from {_describe(producer, module, prefix)}, not a layer module")
            return
        layer = module.get_submodule(producer.target)
        path = _join(prefix, producer.target)
        fn = find_fold_fn(self.table, layer, None, stats, bn_first=False)
        try:
            if fn is None:
                raise FoldSkipped(f"no fold function for {type(layer).__name__} followed by a BatchNorm")
            why = (self._layout_problem(layer, kinds, path)
                   or self._producer_problem(producer, args["input"], module, calls, prefix) or self._shared(layer))
            if why:
                raise FoldSkipped(why)
            new_layer = fn(layer, stats)
        except FoldSkipped as exc:
            self.skipped(name, f"not folded into {path}: {exc}")
            return
        folded_layers[producer.target] = new_layer
        node.replace_all_uses_with(args["input"])
        node.graph.erase_node(node)
        self.folded(path, name)

    def _functional_name(self, args: dict[str, Any], node: fx.Node, prefix: str) -> str:
        """The report name of an F.batch_norm: the path of the module owning its running mean, or
        the call's node name when the traced module itself owns it."""
        mean = args.get("running_mean")
        owner = mean.target.rpartition(".")[0] if isinstance(mean, fx.Node) and mean.op == "get_attr" else ""
        return _join(prefix, f"{owner or node.name} (F.batch_norm)")


def _get_attr(module: nn.Module, target: str) -> torch.Tensor:
    owner_path, _, attr = target.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return getattr(owner, attr)
