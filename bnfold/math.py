"""The arithmetic of folding an eval-mode BatchNorm into a neighbouring layer.

Pure tensor functions: tensors in, tensors out, no `nn.Module`. In eval mode a BatchNorm is a
per-channel affine map `y = scale * x + shift` with

    scale = gamma / sqrt(running_var + eps)        shift = beta - running_mean * scale

(`gamma = 1`, `beta = 0` when the BN has `affine=False`). Folding it into the layer that
produces its input scales that layer's output channels; folding it into the layer that consumes
its output scales the layer's input channels and moves `W @ shift` into the bias.

Everything is computed in float64 and cast back to the original dtype, device and memory
format at the end: folding in the storage dtype (float16 / bfloat16) rounds the scale, the
weight and the bias separately and loses up to twice the accuracy.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bn_scale_shift", "fold_bn_after", "fold_bn_before"]


def _math_device(reference: Tensor) -> torch.device:
    # MPS has no float64; everything else computes where the weight lives.
    return torch.device("cpu") if reference.device.type == "mps" else reference.device


def _f64(t: Tensor, device: torch.device) -> Tensor:
    return t.detach().to(device=device, dtype=torch.float64)


def _cast_like(value: Tensor, like: Tensor) -> Tensor:
    """`value` in `like`'s dtype, device and strides (channels_last stays channels_last)."""
    out = torch.empty_like(like, requires_grad=False)
    with torch.no_grad():
        out.copy_(value)
    return out


def bn_scale_shift(running_mean: Tensor, running_var: Tensor, eps: float,
                   gamma: Tensor | None = None, beta: Tensor | None = None,
                   device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """float64 `(scale, shift)` such that eval-mode BN(x) == scale * x + shift per channel."""
    device = device if device is not None else running_mean.device
    mean = _f64(running_mean, device)
    scale = torch.rsqrt(_f64(running_var, device) + float(eps))
    if gamma is not None:
        scale = scale * _f64(gamma, device)
    shift = -mean * scale
    if beta is not None:
        shift = shift + _f64(beta, device)
    return scale, shift


def fold_bn_after(weight: Tensor, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
                  eps: float, gamma: Tensor | None = None, beta: Tensor | None = None, *,
                  transposed: bool = False, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Fold a BN applied to the *output* of a conv, transposed conv or linear layer.

    `weight` is laid out as PyTorch stores it: `(out, in/groups, *k)` for Conv and Linear,
    `(in, out/groups, *k)` for ConvTranspose (hence `transposed` and `groups`). Returns the new
    `(weight, bias)`; the bias is created when the layer had none.
    """
    device = _math_device(weight)
    scale, shift = bn_scale_shift(running_mean, running_var, eps, gamma, beta, device)
    w = _f64(weight, device)
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    if scale.numel() != out_channels:
        raise ValueError(f"BatchNorm has {scale.numel()} channels but the layer produces {out_channels}")
    kernel_ones = [1] * (w.dim() - 2)
    if transposed:
        # Output channel o of group g is column o - g*(out/groups) of the rows of group g.
        grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        w = (grouped * scale.reshape(groups, 1, w.shape[1], *kernel_ones)).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = shift if bias is None else _f64(bias, device) * scale + shift
    return _cast_like(w, weight), _cast_like(b, bias if bias is not None else weight.new_empty(b.shape))


def fold_bn_before(weight: Tensor, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
                   eps: float, gamma: Tensor | None = None, beta: Tensor | None = None, *,
                   groups: int = 1) -> tuple[Tensor, Tensor]:
    """Fold a BN applied to the *input* of a (non-transposed) conv or linear layer.

    `W (scale * x + shift) + b = (W * scale) x + (b + W shift)`. For a conv this is exact only
    when the conv never sees zero padding (the padded zeros would not have been shifted), which
    the caller must check; `weight` is `(out, in/groups, *k)`.
    """
    device = _math_device(weight)
    scale, shift = bn_scale_shift(running_mean, running_var, eps, gamma, beta, device)
    w = _f64(weight, device)
    out_channels, in_per_group = w.shape[0], w.shape[1]
    if scale.numel() != in_per_group * groups:
        raise ValueError(f"BatchNorm has {scale.numel()} channels but the layer takes {in_per_group * groups}")
    # Per output channel, the input channels of its group: (out, in/groups).
    per_out = out_channels // groups
    kernel_ones = [1] * (w.dim() - 2)
    s = scale.reshape(groups, in_per_group).repeat_interleave(per_out, dim=0).reshape(out_channels, in_per_group, *kernel_ones)
    t = shift.reshape(groups, in_per_group).repeat_interleave(per_out, dim=0).reshape(out_channels, in_per_group, *kernel_ones)
    b = (w * t).sum(dim=tuple(range(1, w.dim())))
    if bias is not None:
        b = b + _f64(bias, device)
    w = w * s
    return _cast_like(w, weight), _cast_like(b, bias if bias is not None else weight.new_empty(b.shape))
