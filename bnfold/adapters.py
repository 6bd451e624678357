"""Reading a BatchNorm-like module as the per-channel affine map it computes in eval mode.

One place turns a module into `BNStats` (running mean, running var, eps, gamma, beta, and what
still runs after the affine map) or says why not with `FoldSkipped`:

- torch's `_BatchNorm` family (BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones once initialized);
- torchvision's `FrozenBatchNorm2d` (which timm uses too), timm's `BatchNormAct2d`,
  `SyncBatchNormAct` and `FrozenBatchNormAct2d` (the BN part is folded, the drop and activation
  stay as a `BatchNormActTail` that still runs). timm and torchvision are recognized by the
  qualified name of the class, so neither is imported here;
- any other module of the caller's, recognized by what it does, whatever it names its tensors
  and wherever its arithmetic lives (a method or a free function such as Dive into Deep
  Learning's `batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum)`): a float64
  copy of it, run under `no_grad` in eval mode on the input the model really feeds it (recorded
  with a forward pre-hook while the model runs on example inputs), must compute a per-channel
  affine map `y = a_c * x + b_c` (channels on axis 1), which is then folded as `a` and `b`;
- without example inputs, a module that looks like a BatchNorm by its attributes (`running_mean`,
  `running_var`, `eps` and `weight`/`bias` or `gamma`/`beta`) is trusted once a float64 copy,
  run on probe inputs of each rank it takes, equals `gamma * (x - mean) / sqrt(var + eps) + beta`;
- a module that looks like a normalization (statistics-like tensors, "norm" or "bn" in its
  class name) and is none of the above is reported with the reason it was not folded;
- a class the caller declares with `bnfold.fold(model, batchnorms={MyBN: adapter})`, where
  `adapter(module) -> BNStats` (raising `FoldSkipped` when a module cannot be folded).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from bnfold.errors import BnfoldError, FoldSkipped, first_line

__all__ = ["BNStats", "Adapter", "BatchNormActTail", "BatchNormReader", "KNOWN_ADAPTERS", "check_running_stats",
           "affine_candidate", "looks_like_batchnorm", "looks_like_normalization", "probe_affine", "qualname"]

_ALL_DIMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class BNStats:
    """What an eval-mode BatchNorm-like module computes: `tail(gamma * (x - mean) / sqrt(var + eps) + beta)`
    per channel (axis 1). `weight` (gamma) and `bias` (beta) are None for `affine=False`.

    `tail` is the module that still has to run after the affine map once it was folded away (timm's
    drop + activation), None for nothing. `like` lists the torch BatchNorm classes it behaves as
    (which input ranks it takes), for looking up a fold function in the pattern table. `rank` is
    the rank of the input the model feeds it, when known (a probe on the real input): a Linear
    layer takes it only at rank 2, where axis 1 is the Linear's feature axis.
    """

    running_mean: Tensor
    running_var: Tensor
    eps: float
    weight: Tensor | None = None
    bias: Tensor | None = None
    tail: nn.Module | None = None
    like: tuple[type[nn.Module], ...] = _ALL_DIMS
    rank: int | None = None

    @classmethod
    def affine(cls, scale: Tensor, shift: Tensor, **kwargs: Any) -> BNStats:
        """The per-channel map `scale * x + shift` as BatchNorm statistics: mean 0, var 1, eps 0,
        gamma `scale`, beta `shift` (exact: the fold's sqrt(1 + 0) is 1)."""
        return cls(torch.zeros_like(scale), torch.ones_like(scale), 0.0, scale, shift, **kwargs)

    @property
    def num_features(self) -> int:
        return self.running_mean.numel()

    def channels(self, start: int, stop: int) -> BNStats:
        """The statistics of channels `start:stop` (for a BN after the concatenation of layers)."""
        part = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return replace(self, running_mean=self.running_mean[start:stop], running_var=self.running_var[start:stop],
                       weight=part(self.weight), bias=part(self.bias))


Adapter = Callable[[nn.Module], BNStats]


class BatchNormActTail(nn.Module):
    """What is left of a BatchNorm + activation module (timm's `BatchNormAct2d`) once its BatchNorm
    part was folded into the layer before it: the drop and the activation, which still run."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_running_stats(bn: Any) -> None:
    """`FoldSkipped` unless `bn` normalizes with running statistics in eval mode."""
    if getattr(bn, "track_running_stats", True) is False or bn.running_mean is None or bn.running_var is None:
        raise FoldSkipped("BatchNorm has no running statistics (track_running_stats=False): "
                          "it normalizes with batch statistics even in eval mode")
    if isinstance(bn.running_mean, (UninitializedParameter, UninitializedBuffer)):
        raise FoldSkipped("BatchNorm is lazy and not initialized yet (run one forward pass first)")


def _like(module: nn.Module) -> tuple[type[nn.Module], ...]:
    # BatchNormAct2d is a BatchNorm2d; SyncBatchNorm and lazy BNs take any rank.
    found = tuple(t for t in _ALL_DIMS if isinstance(module, t))
    return found or _ALL_DIMS


def _torch_bn(module: nn.Module) -> BNStats:
    check_running_stats(module)
    return BNStats(module.running_mean, module.running_var, float(module.eps), module.weight, module.bias,
                   like=_like(module))


def _frozen_bn(module: nn.Module) -> BNStats:
    # torchvision's and timm's FrozenBatchNorm2d: four buffers, forward `x * scale + shift`.
    return BNStats(module.running_mean, module.running_var, float(module.eps), module.weight, module.bias,
                   like=(nn.BatchNorm2d,))


def _tail(module: nn.Module) -> nn.Module | None:
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    parts = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
    if not parts:
        return None
    return BatchNormActTail(drop if drop is not None else nn.Identity(), act if act is not None else nn.Identity())


def _bn_act(module: nn.Module) -> BNStats:
    # timm's BatchNormAct2d / SyncBatchNormAct: F.batch_norm, then self.drop, then self.act.
    return replace(_torch_bn(module), tail=_tail(module))


def _frozen_bn_act(module: nn.Module) -> BNStats:
    return replace(_frozen_bn(module), tail=_tail(module))


# Third-party classes, by qualified name so that their packages are never imported here. Each
# was read: its eval forward is exactly the map its adapter returns.
KNOWN_ADAPTERS: Mapping[str, Adapter] = MappingProxyType({
    "torchvision.ops.misc.FrozenBatchNorm2d": _frozen_bn,
    "timm.layers.norm_act.BatchNormAct2d": _bn_act,
    "timm.layers.norm_act.SyncBatchNormAct": _bn_act,
    "timm.layers.norm_act.FrozenBatchNormAct2d": _frozen_bn_act,
})

# torch's own classes (their forward is torch's); a _BatchNorm subclass with its own forward is
# checked like any unknown class.
_TORCH_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}

_MEAN_VAR = ("running_mean", "running_var")
_AFFINE_NAMES = (("weight", "bias"), ("gamma", "beta"))


def _tensor_attr(module: nn.Module, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def looks_like_batchnorm(module: nn.Module) -> bool:
    """Running statistics and an eps: a BatchNorm by its attributes, whatever its class."""
    if isinstance(module, _BatchNorm):
        return True
    return (all(_tensor_attr(module, n) is not None for n in _MEAN_VAR)
            and isinstance(getattr(module, "eps", None), (float, int, Tensor)))


class _Probed:
    """An unknown BatchNorm-like class, read from its attributes and trusted only once a float64
    copy of it, run in eval mode on probe inputs, computed exactly that affine map."""

    ranks = (4, 2, 3, 5)  # 4-D first: most BNs are 2-D ones

    def __call__(self, module: nn.Module) -> BNStats:
        mean, var = (_tensor_attr(module, n) for n in _MEAN_VAR)
        if mean is None or var is None:
            raise FoldSkipped(f"{type(module).__name__} has no running_mean / running_var tensors "
                              "(track_running_stats=False?): it normalizes with batch statistics")
        gamma = beta = None
        for w_name, b_name in _AFFINE_NAMES:
            w, b = _tensor_attr(module, w_name), _tensor_attr(module, b_name)
            if w is not None or b is not None:
                gamma, beta = w, b
                break
        eps = getattr(module, "eps")
        eps = float(eps.item() if isinstance(eps, Tensor) else eps)
        n = mean.numel()
        tensors = [t for t in (mean, var, gamma, beta) if t is not None]
        # (C,) or a broadcastable (1, C, 1, 1) as tutorials keep them: one axis of C, the rest 1.
        if any(t.numel() != n or sum(d != 1 for d in t.shape) > 1 for t in tensors):
            raise FoldSkipped(f"{type(module).__name__} looks like a BatchNorm but its statistics are not "
                              f"per-channel vectors of one length ({', '.join(str(list(t.shape)) for t in tensors)})")
        flat = [None if t is None else t.reshape(-1) for t in (mean, var, gamma, beta)]
        stats = BNStats(flat[0], flat[1], eps, flat[2], flat[3])
        like = self._verify(module, stats, n)
        return replace(stats, like=like)

    def _verify(self, module: nn.Module, stats: BNStats, n: int) -> tuple[type[nn.Module], ...]:
        from bnfold.math import bn_scale_shift

        probe = _float64_copy(module)
        scale, shift = bn_scale_shift(stats.running_mean, stats.running_var, stats.eps, stats.weight, stats.bias,
                                      device=torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        like: list[type[nn.Module]] = []
        for rank in self.ranks:
            x = torch.randn(2, n, *([3] * (rank - 2)), generator=generator, dtype=torch.float64)
            try:
                with torch.no_grad():
                    out = probe(x)
            except Exception:  # the class does not take this rank: try the next
                continue
            view = (1, n) + (1,) * (rank - 2)
            expected = x * scale.reshape(view) + shift.reshape(view)
            if not isinstance(out, Tensor) or out.shape != x.shape:
                # A (1, C, 1, 1) statistic broadcasts a 2-D input to 4-D: this class does not
                # take that rank, which says nothing about the ranks it does take.
                continue
            diff = (out.double() - expected).abs().max().item()
            if not diff <= 1e-9 * max(1.0, expected.abs().max().item()):
                raise FoldSkipped(f"{type(module).__name__} looks like a BatchNorm, but in eval mode it does not "
                                  "compute gamma * (x - running_mean) / sqrt(running_var + eps) + beta (max "
                                  f"difference {diff:.2e} on a float64 probe): declare it with batchnorms= if it "
                                  "is one")
            like.append({2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank])
        if not like:
            raise FoldSkipped(f"{type(module).__name__} looks like a BatchNorm but failed, or changed the shape, on "
                              "every probe input (2-D to 5-D, channels on axis 1); pass example inputs "
                              "(the CLI's --input-shape) so that it is probed on the input the model feeds it")
        return tuple(dict.fromkeys(like))


def _float64_copy(module: nn.Module) -> nn.Module:
    """An eval-mode float64 copy of `module` on the CPU (whatever device the model is on: probes
    are small), its plain tensor attributes converted too."""
    probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
    for sub in probe.modules():
        # .to() converts parameters and buffers only; a tutorial keeps statistics as plain
        # tensors, which would otherwise stay behind (and round the probe to float32).
        for key, value in list(vars(sub).items()):
            if isinstance(value, Tensor) and value.is_floating_point():
                setattr(sub, key, value.detach().to(device="cpu", dtype=torch.float64))
    return probe


def _own_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The floating tensors a module holds itself: parameters, buffers and plain attributes."""
    found = {k: v for k, v in vars(module).items() if isinstance(v, Tensor)}
    found.update((k, v) for k, v in module._parameters.items() if v is not None)
    found.update((k, v) for k, v in module._buffers.items() if v is not None)
    return {k: v for k, v in found.items() if v.is_floating_point()}


# torch's per-sample normalizations (and subclasses such as timm's LayerNorm2d): documented as
# not a fixed map, so they are neither probed nor reported as BatchNorms left behind.
_PER_SAMPLE_NORMS: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d, getattr(nn, "RMSNorm", None),
                nn.modules.instancenorm._InstanceNorm) if t is not None)
_STAT_NAME = ("mean", "var", "std", "sigma", "stat")


def _is_torch_class(cls: type) -> bool:
    return cls.__module__ == "torch" or cls.__module__.startswith("torch.")


def _holds_layers(module: nn.Module) -> bool:
    """A submodule holds tensors of its own: `module` is a block (conv + BN), not one normalization."""
    return any(_own_tensors(sub) for sub in module.modules() if sub is not module)


def looks_like_normalization(module: nn.Module) -> str | None:
    """Why `module` looks like a normalization layer ("norm"/"bn" in its class name, tensors named
    like statistics), or None. torch's own classes and per-sample norms are known, not guessed."""
    cls = type(module)
    if (_is_torch_class(cls) or isinstance(module, (_PER_SAMPLE_NORMS, BatchNormActTail))
            or _holds_layers(module)):
        return None
    stats = [k for k in _own_tensors(module) if any(w in k.lower() for w in _STAT_NAME)]
    name = cls.__name__.lower()
    if stats:
        return f"tensors {', '.join(stats)}"
    if "norm" in name or "bn" in name:
        return f"class name {cls.__name__!r}"
    return None


def affine_candidate(module: nn.Module) -> bool:
    """A module of the caller's that might compute a per-channel affine map and so is worth a
    probe on its real input: no torch class, no block of layers, some per-channel-shaped tensor."""
    if _is_torch_class(type(module)) or isinstance(module, _PER_SAMPLE_NORMS) or _holds_layers(module):
        return False
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):  # a layer subclass: a layer, not a map
        return False
    return any(t.numel() >= 1 and sum(d != 1 for d in t.shape) <= 1 for t in _own_tensors(module).values())


_RANK_LIKE = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_PROBE_RTOL = 1e-9  # float64: an affine map computed any way is exact to ~1e-15


def probe_affine(module: nn.Module, example: Tensor) -> BNStats:
    """`BNStats` of the per-channel affine map `y = a_c * x + b_c` that `module` computes on inputs
    shaped like `example` (the input the model feeds it; channels on axis 1), or `FoldSkipped`
    saying how it is not one. A float64 copy runs in eval mode under `no_grad`: `b` is its output
    on zeros, `a` on ones minus `b`; each must be one value per channel, and the map must then
    reproduce the output on `example` itself and on random inputs of its shape."""
    what = type(module).__name__
    shape = tuple(example.shape)
    if example.dim() < 2 or not example.is_floating_point():
        raise FoldSkipped(f"{what} takes a {example.dim()}-D {str(example.dtype).replace('torch.', '')} input "
                          f"{list(shape)}: not channels on axis 1 of a float tensor")
    probe = _float64_copy(module)
    x = example.detach().to(device="cpu", dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    spread = float(x.std()) if x.numel() > 1 else 1.0
    randoms = [torch.randn(shape, generator=generator, dtype=torch.float64) * max(spread, 1.0) + float(x.mean())
               for _ in range(2)]

    def run(inp: Tensor) -> Tensor:
        try:
            with torch.no_grad():
                out = probe(inp)
        except Exception as exc:  # noqa: BLE001 - the caller's module, failing in its own words
            raise FoldSkipped(f"{what} failed on a float64 copy of its input {list(shape)} "
                              f"({first_line(exc, with_type=True, limit=160)})")
        if not isinstance(out, Tensor) or tuple(out.shape) != shape:
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise FoldSkipped(f"{what} returns {got} for its input {list(shape)}: not an elementwise map")
        return out

    shift = run(torch.zeros_like(x))
    scale = run(torch.ones_like(x)) - shift
    channels = shape[1]
    per = {}
    for name, t in (("scale", scale), ("shift", shift)):
        rows = t.transpose(0, 1).reshape(channels, -1)
        spread_c = (rows.max(dim=1).values - rows.min(dim=1).values).abs().max().item()
        if not spread_c <= _PROBE_RTOL * max(1.0, rows.abs().max().item()):
            raise FoldSkipped(f"{what} is not a per-channel affine map on its input {list(shape)}: its "
                              f"{name} varies within a channel (by {spread_c:.2e})")
        per[name] = rows[:, 0].clone()
    view = (1, channels) + (1,) * (len(shape) - 2)
    for inp, label in [(x, "the model's own input")] + [(r, "a random input") for r in randoms]:
        expected = inp * per["scale"].reshape(view) + per["shift"].reshape(view)
        diff = (run(inp) - expected).abs().max().item()
        if not diff <= _PROBE_RTOL * max(1.0, expected.abs().max().item()):
            raise FoldSkipped(f"{what} is not a per-channel affine map y = a*x + b in eval mode (max difference "
                              f"{diff:.2e} on {label} of shape {list(shape)}, float64); if it is a BatchNorm, "
                              "declare it with batchnorms= (CLI: --batchnorm CLASS=ADAPTER)")
    return BNStats.affine(per["scale"], per["shift"], like=(_RANK_LIKE.get(len(shape), nn.BatchNorm1d),),
                          rank=len(shape))


class BatchNormReader:
    """Which modules are BatchNorm-like, and their `BNStats`; one per fold, caching what it probed.

    `batchnorms` maps a class to the caller's adapter; it wins over everything built in (and
    applies to subclasses). `inputs` maps `id(module)` to the input the model fed that module
    (recorded by `bnfold.fx_fold.record_inputs`): a module of the caller's with such an input is
    judged by what it computes on it (`probe_affine`).
    """

    def __init__(self, batchnorms: Mapping[type, Adapter] | None = None,
                 inputs: Mapping[int, Tensor] | None = None) -> None:
        for cls, fn in (batchnorms or {}).items():
            if not isinstance(cls, type) or not callable(fn):
                raise BnfoldError(f"batchnorms maps module classes to adapters module -> BNStats, got {cls!r}: {fn!r}")
        self.user = dict(batchnorms or {})
        self.inputs = dict(inputs or {})
        self._cache: dict[int, BNStats | FoldSkipped] = {}
        self._probe = _Probed()

    def adapter(self, module: nn.Module) -> Adapter | None:
        """The adapter for `module`, or None when it is not BatchNorm-like."""
        cls = type(module)
        for base in cls.__mro__:
            if base in self.user:
                return self.user[base]
        known = KNOWN_ADAPTERS.get(qualname(cls))
        if known is not None:
            return known
        if isinstance(module, _BatchNorm) and cls.forward in _TORCH_FORWARDS:
            return _torch_bn
        if id(module) in self.inputs and affine_candidate(module):
            return self._by_behaviour
        if looks_like_batchnorm(module):
            return self._probe
        if looks_like_normalization(module):
            return self._unprobed
        return None

    def _by_behaviour(self, module: nn.Module) -> BNStats:
        return probe_affine(module, self.inputs[id(module)])

    def _unprobed(self, module: nn.Module) -> BNStats:
        why = looks_like_normalization(module)
        given = ("it never ran in the model's forward on the example inputs" if self.inputs else
                 "pass example inputs (bnfold.fold(model, example_inputs=x); the CLI passes --input-shape)")
        raise FoldSkipped(f"{type(module).__name__} looks like a normalization ({why}), but bnfold recognizes such "
                          f"a class by running it on the input the model feeds it: {given}; or declare it with "
                          "batchnorms= (CLI: --batchnorm CLASS=ADAPTER)")

    def quiet(self, module: nn.Module) -> bool:
        """A module of the caller's that is judged only by what it computes and does not look like a
        normalization: when it is not folded that is said in the notes, not as a BatchNorm left."""
        return (self.adapter(module) == self._by_behaviour and not looks_like_batchnorm(module)
                and looks_like_normalization(module) is None)

    def is_leaf(self, module: object) -> bool:
        """A BatchNorm-like module that tracing keeps whole. One that only looks like a
        normalization is traced into instead: its forward may hold an F.batch_norm to fold."""
        return self.is_batchnorm(module) and self.adapter(module) != self._unprobed  # type: ignore[arg-type]

    def is_batchnorm(self, module: object) -> bool:
        if not isinstance(module, nn.Module):
            return False
        fn = self.adapter(module)
        if fn is None:
            return False
        if self.quiet(module):  # a BatchNorm only if it computes a per-channel affine map
            try:
                self.read(module)
            except FoldSkipped:
                return False
        return True

    def read(self, module: nn.Module) -> BNStats:
        """`BNStats` of a BatchNorm-like module, or `FoldSkipped` with the reason it cannot be folded."""
        key = id(module)
        if key not in self._cache:
            fn = self.adapter(module)
            try:
                if fn is None:
                    raise FoldSkipped(f"{type(module).__name__} is not a BatchNorm")
                stats = fn(module)
                if not isinstance(stats, BNStats):
                    raise BnfoldError(f"the batchnorms adapter for {type(module).__name__} returned "
                                      f"{type(stats).__name__}, not BNStats")
                if not math.isfinite(stats.eps):
                    raise FoldSkipped(f"eps is {stats.eps}")
                self._cache[key] = stats
            except FoldSkipped as exc:
                self._cache[key] = exc
        result = self._cache[key]
        if isinstance(result, FoldSkipped):
            raise FoldSkipped(str(result))
        return result
