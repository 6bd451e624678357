"""Reading a BatchNorm-like module as the per-channel affine map it computes in eval mode.

One place turns a module into `BNStats` (running mean, running var, eps, gamma, beta, and what
still runs after the affine map) or says why not with `FoldSkipped`:

- torch's `_BatchNorm` family (BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones once initialized);
- torchvision's `FrozenBatchNorm2d` (which timm uses too), timm's `BatchNormAct2d`,
  `SyncBatchNormAct` and `FrozenBatchNormAct2d` (the BN part is folded, the drop and activation
  stay as a `BatchNormActTail` that still runs). timm and torchvision are recognized by the
  qualified name of the class, so neither is imported here;
- any other module that looks like a BatchNorm (`running_mean`, `running_var`, `eps` and
  `weight`/`bias` or `gamma`/`beta`, as buffers, parameters or plain tensors), e.g. the
  from-scratch class of a BN tutorial. It is trusted only after a check: a float64 copy is run in
  eval mode on probe inputs and must equal `gamma * (x - mean) / sqrt(var + eps) + beta`;
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

from bnfold.errors import BnfoldError, FoldSkipped

__all__ = ["BNStats", "Adapter", "BatchNormActTail", "BatchNormReader", "KNOWN_ADAPTERS", "check_running_stats",
           "looks_like_batchnorm", "qualname"]

_ALL_DIMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class BNStats:
    """What an eval-mode BatchNorm-like module computes: `tail(gamma * (x - mean) / sqrt(var + eps) + beta)`
    per channel (axis 1). `weight` (gamma) and `bias` (beta) are None for `affine=False`.

    `tail` is the module that still has to run after the affine map once it was folded away (timm's
    drop + activation), None for nothing. `like` lists the torch BatchNorm classes it behaves as
    (which input ranks it takes), for looking up a fold function in the pattern table.
    """

    running_mean: Tensor
    running_var: Tensor
    eps: float
    weight: Tensor | None = None
    bias: Tensor | None = None
    tail: nn.Module | None = None
    like: tuple[type[nn.Module], ...] = _ALL_DIMS

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

        # On the CPU, whatever device the model is on: the probe is small.
        probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
        for sub in probe.modules():
            # .to() converts parameters and buffers only; a tutorial keeps statistics as plain
            # tensors, which would otherwise stay behind (and round the probe to float32).
            for key, value in list(vars(sub).items()):
                if isinstance(value, Tensor) and value.is_floating_point():
                    setattr(sub, key, value.detach().to(device="cpu", dtype=torch.float64))
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
                raise FoldSkipped(f"{type(module).__name__} looks like a BatchNorm but returns "
                                  f"{type(out).__name__} of another shape on a {rank}-D input")
            diff = (out.double() - expected).abs().max().item()
            if not diff <= 1e-9 * max(1.0, expected.abs().max().item()):
                raise FoldSkipped(f"{type(module).__name__} looks like a BatchNorm, but in eval mode it does not "
                                  "compute gamma * (x - running_mean) / sqrt(running_var + eps) + beta (max "
                                  f"difference {diff:.2e} on a float64 probe): declare it with batchnorms= if it "
                                  "is one")
            like.append({2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank])
        if not like:
            raise FoldSkipped(f"{type(module).__name__} looks like a BatchNorm but failed on every probe input "
                              "(2-D to 5-D, channels on axis 1)")
        return tuple(dict.fromkeys(like))


class BatchNormReader:
    """Which modules are BatchNorm-like, and their `BNStats`; one per fold, caching what it probed.

    `batchnorms` maps a class to the caller's adapter; it wins over everything built in (and
    applies to subclasses).
    """

    def __init__(self, batchnorms: Mapping[type, Adapter] | None = None) -> None:
        for cls, fn in (batchnorms or {}).items():
            if not isinstance(cls, type) or not callable(fn):
                raise BnfoldError(f"batchnorms maps module classes to adapters module -> BNStats, got {cls!r}: {fn!r}")
        self.user = dict(batchnorms or {})
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
        if looks_like_batchnorm(module):
            return self._probe
        return None

    def is_batchnorm(self, module: object) -> bool:
        return isinstance(module, nn.Module) and self.adapter(module) is not None

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
