"""One pair of modules in, one module out.

`DEFAULT_FOLDERS` maps `(first_type, second_type)`, in data-flow order, to the fold function of
the pair: `(nn.Conv2d, nn.BatchNorm2d)` folds a BN that follows a conv, `(nn.BatchNorm1d,
nn.Linear)` one that precedes a linear layer. A pair is looked up by its exact types first; then
a layer subclass that does not change `forward` (torchvision's `Conv3DSimple`), or a known wrapper
(timm's "same"-padding `Conv2dSame`), counts as its torch base class, and a BatchNorm-like module
as the torch BatchNorm it behaves like (`BNStats.like`). A subclass with its own `forward` (weight
standardisation, a parametrization) is never folded by accident. Callers extend or override the
table with the `folders` argument of `bnfold.fold`, never by editing the global.

A fold function takes the two in data-flow order, the BatchNorm side as `BNStats` (which has a
BatchNorm module's `running_mean`, `running_var`, `eps`, `weight`, `bias`), returns a new layer and
leaves its inputs untouched; when a guard refuses the pair it raises `FoldSkipped`, whose message
becomes the reason in the report.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.parameter import UninitializedParameter

from bnfold.adapters import BatchNormReader, BNStats, check_running_stats, qualname
from bnfold.errors import BnfoldError, FoldSkipped
from bnfold.math import fold_bn_after, fold_bn_before

__all__ = ["DEFAULT_FOLDERS", "PASSTHROUGH", "FoldFn", "FoldSkipped", "fold_bn_after_layer", "fold_bn_before_layer",
           "merge_folders", "merge_table", "is_batchnorm", "check_running_stats", "layer_kind", "find_fold_fn", "check_hooks"]

# A fold function: (layer, BNStats) or (BNStats, layer) in data-flow order -> the folded layer.
FoldFn = Callable[[Any, Any], nn.Module]

# Modules that are the identity in eval mode: they may sit between a layer and its BN.
PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def is_batchnorm(module: object) -> bool:
    """A BatchNorm-like module that bnfold's built-in adapters recognize (see `bnfold.adapters`)."""
    return BatchNormReader().is_batchnorm(module)


# The torch layer classes folds know; a subclass counts as one when it keeps its forward.
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
)

# Wrappers whose forward is provably their base's computation on the same weight, by qualified
# name (never imported). The value is the base class and whether the wrapper pads with zeros
# on its own, which a BN before it cannot be folded through (its `padding` attribute says 0).
KNOWN_LAYERS: Mapping[str, tuple[type[nn.Module], bool]] = MappingProxyType({
    # F.pad(x, TF "same" amounts, value=0) then F.conv2d(x, weight, bias, stride, 0, dilation, groups)
    "timm.layers.conv2d_same.Conv2dSame": (nn.Conv2d, True),
    # F.linear(x, weight, bias), casting them to x's dtype only under torchscript
    "timm.layers.linear.Linear": (nn.Linear, False),
})


def layer_kind(layer: object) -> type[nn.Module] | None:
    """The torch layer class `layer` computes as (its own class, a base whose `forward` it keeps, or
    a known wrapper's base), or None."""
    cls = type(layer)
    known = KNOWN_LAYERS.get(qualname(cls))
    if known is not None:
        return known[0]
    for base in cls.__mro__:
        if base in LAYER_TYPES:
            same = cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)
            return base if same else None
    return None


def find_fold_fn(table: Mapping[tuple[type, type], FoldFn], layer: nn.Module, bn: nn.Module | None,
                 stats: BNStats, *, bn_first: bool) -> FoldFn | None:
    """The fold function for `layer` and a BatchNorm (`bn` module, None for F.batch_norm), in the
    order `bn_first` says: the exact pair of types first, then the torch classes they compute as."""
    layers = [type(layer)] + [k for k in (layer_kind(layer),) if k is not None and k is not type(layer)]
    bns = ([type(bn)] if bn is not None else []) + [t for t in stats.like if t is not type(bn)]
    for lt in layers:
        for bt in bns:
            fn = table.get((bt, lt) if bn_first else (lt, bt))
            if fn is not None:
                return fn
    return None


def _as_stats(bn: Any) -> BNStats:
    if isinstance(bn, BNStats):
        return bn
    if isinstance(bn, nn.Module):
        return BatchNormReader().read(bn)
    # Anything with a BatchNorm's attributes (a functional call's tensors).
    check_running_stats(bn)
    return BNStats(bn.running_mean, bn.running_var, float(bn.eps), bn.weight, bn.bias)


def check_hooks(module: nn.Module) -> None:
    # A pre-hook may recompute the weight on every call (torch.nn.utils.weight_norm does),
    # which would silently undo the fold; any hook may depend on the unfolded values.
    hooks = [k for k in ("_forward_pre_hooks", "_forward_hooks") if getattr(module, k, None)]
    if hooks:
        raise FoldSkipped(f"{type(module).__name__} has forward hooks ({', '.join(hooks)}), e.g. from "
                          "torch.nn.utils.weight_norm, which could recompute or depend on the unfolded weights")


def _check_pair(layer: nn.Module, bn: Any) -> BNStats:
    """The guards every fold function runs first: running statistics, an initialized layer, no
    hooks. Returns the BatchNorm's statistics."""
    stats = _as_stats(bn)
    # Before the hooks: a lazy layer's initializing pre-hook is not the problem to report.
    if isinstance(layer.weight, UninitializedParameter):
        raise FoldSkipped(f"{type(layer).__name__} is lazy and not initialized yet (run one forward pass first)")
    if isinstance(bn, nn.Module):
        check_hooks(bn)
    check_hooks(layer)
    return stats


def _check_linear_rank(layer: nn.Module, bn: BNStats) -> None:
    # A Linear's features are the last axis, a BatchNorm's channels axis 1: the same axis only on
    # 2-D inputs. The rank is known when the BatchNorm was probed on the input the model feeds it.
    if isinstance(layer, nn.Linear) and bn.rank is not None and bn.rank != 2:
        raise FoldSkipped(f"the BatchNorm normalizes axis 1 of a {bn.rank}-D input, which is not the features "
                          f"axis (the last) of the {type(layer).__name__}")


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels


def _in_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels


def _with_params(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of `layer` holding `weight` and `bias`, with the original `requires_grad`."""
    grad = layer.weight.requires_grad
    params = dict(layer._parameters)
    # Don't deep-copy the old weights only to throw them away.
    layer._parameters = {k: v for k, v in params.items() if k not in ("weight", "bias")}
    try:
        new = copy.deepcopy(layer)
    finally:
        layer._parameters = params
    new.weight = nn.Parameter(weight, requires_grad=grad)
    new.bias = nn.Parameter(bias, requires_grad=grad if layer.bias is None else layer.bias.requires_grad)
    return new


def _bn_args(bn: BNStats) -> tuple:
    return (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def fold_bn_after_layer(layer: nn.Module, bn: Any) -> nn.Module:
    """Conv / ConvTranspose / Linear followed by an eval-mode BatchNorm -> one layer with bias.

    `bn` may be `BNStats`, a BatchNorm-like module or anything with `running_mean`, `running_var`,
    `eps`, `weight`, `bias`.
    """
    bn = _check_pair(layer, bn)
    _check_linear_rank(layer, bn)
    channels = _out_channels(layer)
    if bn.num_features != channels:
        raise FoldSkipped(f"shapes disagree: {type(layer).__name__} produces {channels} channels, "
                          f"the BatchNorm normalizes {bn.num_features}")
    transposed = isinstance(layer, _ConvTransposeNd)
    w, b = fold_bn_after(layer.weight, layer.bias, *_bn_args(bn), transposed=transposed,
                         groups=getattr(layer, "groups", 1))
    return _with_params(layer, w, b)


def _zero_padding(layer: nn.Module) -> bool:
    known = KNOWN_LAYERS.get(qualname(type(layer)))
    if known is not None and known[1]:
        # "same" padding pads only where some kernel is wider than 1.
        return any(d * (k - 1) > 0 for d, k in zip(layer.dilation, layer.kernel_size))
    if not isinstance(layer, _ConvNd) or layer.padding_mode != "zeros":
        return False
    padding = layer.padding
    if isinstance(padding, str):
        # "valid" pads nothing; "same" pads only when some kernel is wider than 1.
        return padding == "same" and any(
            d * (k - 1) > 0 for d, k in zip(layer.dilation, layer.kernel_size))
    return any(p != 0 for p in padding)


def fold_bn_before_layer(bn: Any, layer: nn.Module) -> nn.Module:
    """An eval-mode BatchNorm followed by a Conv or Linear -> one layer with bias.

    Exact for Linear, and for a Conv without zero padding (padding 0, or a reflect / replicate /
    circular padding mode, which pad with values that went through the BN too).
    """
    bn = _check_pair(layer, bn)
    if bn.tail is not None:
        raise FoldSkipped(f"its {type(bn.tail).__name__} runs between the BatchNorm and the following layer")
    if isinstance(layer, _ConvTransposeNd):
        raise FoldSkipped("BatchNorm before a ConvTranspose is not folded: the shift would reach "
                          "border outputs a different number of times, so no bias can express it")
    if _zero_padding(layer):
        raise FoldSkipped(f"BatchNorm before a zero-padded {type(layer).__name__} (padding={_padding_text(layer)}) "
                          "cannot be folded exactly: the padded zeros were never shifted by the BN")
    _check_linear_rank(layer, bn)
    channels = _in_channels(layer)
    if bn.num_features != channels:
        raise FoldSkipped(f"shapes disagree: {type(layer).__name__} takes {channels} channels, "
                          f"the BatchNorm normalizes {bn.num_features}")
    w, b = fold_bn_before(layer.weight, layer.bias, *_bn_args(bn), groups=getattr(layer, "groups", 1))
    return _with_params(layer, w, b)


def _padding_text(layer: nn.Module) -> str:
    return "'same', added in forward" if qualname(type(layer)) in KNOWN_LAYERS else str(layer.padding)


def _table() -> dict[tuple[type, type], FoldFn]:
    table: dict[tuple[type, type], FoldFn] = {}
    for conv, tconv, bn in ((nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
                            (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
                            (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)):
        table[(conv, bn)] = fold_bn_after_layer
        table[(tconv, bn)] = fold_bn_after_layer
        table[(bn, conv)] = fold_bn_before_layer
        # SyncBatchNorm is a plain BatchNorm in eval mode, for any number of dimensions.
        table[(conv, nn.SyncBatchNorm)] = fold_bn_after_layer
        table[(tconv, nn.SyncBatchNorm)] = fold_bn_after_layer
    table[(nn.Linear, nn.BatchNorm1d)] = fold_bn_after_layer
    table[(nn.Linear, nn.SyncBatchNorm)] = fold_bn_after_layer
    table[(nn.BatchNorm1d, nn.Linear)] = fold_bn_before_layer
    return table


DEFAULT_FOLDERS: Mapping[tuple[type, type], FoldFn] = MappingProxyType(_table())


def merge_table(default: Mapping[Any, Callable[..., Any]], overrides: Mapping[Any, Any] | None, *,
                key_ok: Callable[[Any], bool], keys: str) -> dict[Any, Any]:
    """`default` updated with `overrides` (a value of None removes that entry): the one way both
    pattern tables, the module side's and the ONNX side's, are extended by an argument."""
    table = dict(default)
    for key, fn in (overrides or {}).items():
        if not key_ok(key):
            raise BnfoldError(f"folders keys must be {keys}, got {key!r}")
        if fn is None:
            table.pop(key, None)
        elif not callable(fn):
            raise BnfoldError(f"folders[{key!r}] must be callable, got {fn!r}")
        else:
            table[key] = fn
    return table


def merge_folders(folders: Mapping[tuple[type, type], FoldFn | None] | None) -> dict[tuple[type, type], FoldFn]:
    """The default table updated with `folders`; a value of None removes that pattern."""
    return merge_table(DEFAULT_FOLDERS, folders, keys="(type, type) pairs in data-flow order",
                       key_ok=lambda key: isinstance(key, tuple) and len(key) == 2
                       and all(isinstance(t, type) for t in key))
