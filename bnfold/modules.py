"""One pair of modules in, one module out.

`DEFAULT_FOLDERS` maps `(first_type, second_type)`, in data-flow order, to the function that
folds the pair: `(nn.Conv2d, nn.BatchNorm2d)` folds a BN that follows a conv,
`(nn.BatchNorm1d, nn.Linear)` one that precedes a linear layer. Types match exactly, so a
subclass with its own `forward` (weight standardisation, a parametrization) is never folded by
accident. Callers extend or override the table with the `folders` argument of `bnfold.fold`,
never by editing the global.

A folder returns a new layer and leaves both inputs untouched; when a guard refuses the pair it
raises `FoldSkipped`, whose message becomes the reason in the report.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from bnfold.errors import BnfoldError
from bnfold.math import fold_bn_after, fold_bn_before

__all__ = ["DEFAULT_FOLDERS", "PASSTHROUGH", "Folder", "FoldSkipped", "fold_layer_bn", "fold_bn_layer",
           "merge_folders", "is_batchnorm", "check_running_stats"]

Folder = Callable[[Any, Any], nn.Module]

# Modules that are the identity in eval mode: they may sit between a layer and its BN.
PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class FoldSkipped(BnfoldError):
    """A guard refused to fold a pair; the message is the reason shown in the report."""


def is_batchnorm(module: object) -> bool:
    return isinstance(module, _BatchNorm)


def check_running_stats(bn: Any) -> None:
    """`FoldSkipped` unless `bn` normalizes with running statistics in eval mode."""
    if getattr(bn, "track_running_stats", True) is False or bn.running_mean is None or bn.running_var is None:
        raise FoldSkipped("BatchNorm has no running statistics (track_running_stats=False): "
                          "it normalizes with batch statistics even in eval mode")
    if isinstance(bn.running_mean, (UninitializedParameter, UninitializedBuffer)):
        raise FoldSkipped("BatchNorm is lazy and not initialized yet (run one forward pass first)")


def _check_hooks(module: nn.Module) -> None:
    # A pre-hook may recompute the weight on every call (torch.nn.utils.weight_norm does),
    # which would silently undo the fold; any hook may depend on the unfolded values.
    hooks = [k for k in ("_forward_pre_hooks", "_forward_hooks") if getattr(module, k, None)]
    if hooks:
        raise FoldSkipped(f"{type(module).__name__} has forward hooks ({', '.join(hooks)}), e.g. from "
                          "torch.nn.utils.weight_norm, which could recompute or depend on the unfolded weights")


def _check_pair(layer: nn.Module, bn: Any) -> None:
    """The guards every folder runs first: running statistics, an initialized layer, no hooks."""
    check_running_stats(bn)
    # Before the hooks: a lazy layer's initializing pre-hook is not the problem to report.
    if isinstance(layer.weight, UninitializedParameter):
        raise FoldSkipped(f"{type(layer).__name__} is lazy and not initialized yet (run one forward pass first)")
    if isinstance(bn, nn.Module):
        _check_hooks(bn)
    _check_hooks(layer)


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


def _bn_args(bn: Any) -> tuple:
    return (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def fold_layer_bn(layer: nn.Module, bn: Any) -> nn.Module:
    """Conv / ConvTranspose / Linear followed by an eval-mode BatchNorm -> one layer with bias.

    `bn` may be a BatchNorm module or anything with `running_mean`, `running_var`, `eps`,
    `weight`, `bias` (a functional `F.batch_norm` call's tensors).
    """
    _check_pair(layer, bn)
    channels = _out_channels(layer)
    if bn.running_mean.numel() != channels:
        raise FoldSkipped(f"shapes disagree: {type(layer).__name__} produces {channels} channels, "
                          f"the BatchNorm normalizes {bn.running_mean.numel()}")
    transposed = isinstance(layer, _ConvTransposeNd)
    w, b = fold_bn_after(layer.weight, layer.bias, *_bn_args(bn), transposed=transposed,
                         groups=getattr(layer, "groups", 1))
    return _with_params(layer, w, b)


def _zero_padding(layer: nn.Module) -> bool:
    if not isinstance(layer, _ConvNd) or layer.padding_mode != "zeros":
        return False
    padding = layer.padding
    if isinstance(padding, str):
        # "valid" pads nothing; "same" pads only when some kernel is wider than 1.
        return padding == "same" and any(
            d * (k - 1) > 0 for d, k in zip(layer.dilation, layer.kernel_size))
    return any(p != 0 for p in padding)


def fold_bn_layer(bn: Any, layer: nn.Module) -> nn.Module:
    """An eval-mode BatchNorm followed by a Conv or Linear -> one layer with bias.

    Exact for Linear, and for a Conv without zero padding (padding 0, or a reflect / replicate /
    circular padding mode, which pad with values that went through the BN too).
    """
    _check_pair(layer, bn)
    if isinstance(layer, _ConvTransposeNd):
        raise FoldSkipped("BatchNorm before a ConvTranspose is not folded: the shift would reach "
                          "border outputs a different number of times, so no bias can express it")
    if _zero_padding(layer):
        raise FoldSkipped(f"BatchNorm before a zero-padded {type(layer).__name__} (padding={layer.padding}) "
                          "cannot be folded exactly: the padded zeros were never shifted by the BN")
    channels = _in_channels(layer)
    if bn.running_mean.numel() != channels:
        raise FoldSkipped(f"shapes disagree: {type(layer).__name__} takes {channels} channels, "
                          f"the BatchNorm normalizes {bn.running_mean.numel()}")
    w, b = fold_bn_before(layer.weight, layer.bias, *_bn_args(bn), groups=getattr(layer, "groups", 1))
    return _with_params(layer, w, b)


def _table() -> dict[tuple[type, type], Folder]:
    table: dict[tuple[type, type], Folder] = {}
    for conv, tconv, bn in ((nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
                            (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
                            (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)):
        table[(conv, bn)] = fold_layer_bn
        table[(tconv, bn)] = fold_layer_bn
        table[(bn, conv)] = fold_bn_layer
        # SyncBatchNorm is a plain BatchNorm in eval mode, for any number of dimensions.
        table[(conv, nn.SyncBatchNorm)] = fold_layer_bn
        table[(tconv, nn.SyncBatchNorm)] = fold_layer_bn
    table[(nn.Linear, nn.BatchNorm1d)] = fold_layer_bn
    table[(nn.Linear, nn.SyncBatchNorm)] = fold_layer_bn
    table[(nn.BatchNorm1d, nn.Linear)] = fold_bn_layer
    return table


DEFAULT_FOLDERS: Mapping[tuple[type, type], Folder] = MappingProxyType(_table())


def merge_folders(folders: Mapping[tuple[type, type], Folder | None] | None) -> dict[tuple[type, type], Folder]:
    """The default table updated with `folders`; a value of None removes that pattern."""
    table = dict(DEFAULT_FOLDERS)
    for key, fn in (folders or {}).items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(t, type) for t in key)):
            raise BnfoldError(f"folders keys must be (type, type) pairs in data-flow order, got {key!r}")
        if fn is None:
            table.pop(key, None)
        elif not callable(fn):
            raise BnfoldError(f"folders[{key!r}] must be callable, got {fn!r}")
        else:
            table[key] = fn
    return table
