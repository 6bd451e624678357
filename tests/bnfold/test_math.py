"""bnfold.math: the arithmetic alone, against PyTorch's own helpers and direct evaluation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from bnfold.math import bn_scale_shift, fold_bn_after, fold_bn_before


def _stats(n: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    var = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    gamma = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    beta = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    return [t.to(dtype) for t in (mean, var, gamma, beta)]


def _bn(x, mean, var, gamma, beta, eps):
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_weights_match_torch_fusion(with_bias: bool, groups: int) -> None:
    w = torch.randn(8, 6 // groups, 3, 3)
    b = torch.randn(8) if with_bias else None
    mean, var, gamma, beta = _stats(8)
    ours = fold_bn_after(w, b, mean, var, 1e-3, gamma, beta, groups=groups)
    theirs = fuse_conv_bn_weights(w, b, mean, var, 1e-3, gamma, beta)
    torch.testing.assert_close(ours[0], theirs[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1].detach(), rtol=1e-6, atol=1e-6)


def test_transposed_conv_weights_match_torch_fusion() -> None:
    w = torch.randn(6, 8, 3, 3)  # (in, out, k, k)
    b = torch.randn(8)
    mean, var, gamma, beta = _stats(8, seed=1)
    ours = fold_bn_after(w, b, mean, var, 1e-5, gamma, beta, transposed=True)
    theirs = fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta, transpose=True)
    torch.testing.assert_close(ours[0], theirs[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1].detach(), rtol=1e-6, atol=1e-6)


def test_linear_weights_match_torch_fusion() -> None:
    w, b = torch.randn(5, 7), torch.randn(5)
    mean, var, gamma, beta = _stats(5, seed=2)
    ours = fold_bn_after(w, b, mean, var, 1e-5, gamma, beta)
    theirs = fuse_linear_bn_weights(w, b, mean, var, 1e-5, gamma, beta)
    torch.testing.assert_close(ours[0], theirs[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1].detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_transposed_conv_folds_exactly(groups: int) -> None:
    # torch.nn.utils.fusion gets this wrong for groups > 1 (pytorch#180995): check by evaluation.
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    w = torch.randn(8, 12 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64)
    mean, var, gamma, beta = _stats(12, seed=3, dtype=torch.float64)
    ref = _bn(F.conv_transpose2d(x, w, b, stride=2, output_padding=1, groups=groups), mean, var, gamma, beta, 1e-5)
    fw, fb = fold_bn_after(w, b, mean, var, 1e-5, gamma, beta, transposed=True, groups=groups)
    out = F.conv_transpose2d(x, fw, fb, stride=2, output_padding=1, groups=groups)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_affine_false_linear() -> None:
    # torch.nn.utils.fusion.fuse_linear_bn_weights crashes on gamma=None (pytorch#122183).
    x = torch.randn(4, 7, dtype=torch.float64)
    w, b = torch.randn(5, 7, dtype=torch.float64), None
    mean, var, _, _ = _stats(5, seed=4, dtype=torch.float64)
    fw, fb = fold_bn_after(w, b, mean, var, 1e-5)
    torch.testing.assert_close(F.linear(x, fw, fb), _bn(F.linear(x, w), mean, var, None, None, 1e-5))


@pytest.mark.parametrize("groups", [1, 3])
def test_bn_before_conv_without_padding(groups: int) -> None:
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    w = torch.randn(9, 6 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(9, dtype=torch.float64)
    mean, var, gamma, beta = _stats(6, seed=5, dtype=torch.float64)
    ref = F.conv2d(_bn(x, mean, var, gamma, beta, 1e-5), w, b, groups=groups)
    fw, fb = fold_bn_before(w, b, mean, var, 1e-5, gamma, beta, groups=groups)
    torch.testing.assert_close(F.conv2d(x, fw, fb, groups=groups), ref, rtol=1e-12, atol=1e-12)


def test_bn_before_linear() -> None:
    x = torch.randn(3, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    mean, var, gamma, beta = _stats(6, seed=6, dtype=torch.float64)
    fw, fb = fold_bn_before(w, None, mean, var, 1e-5, gamma, beta)
    torch.testing.assert_close(F.linear(x, fw, fb), F.linear(_bn(x, mean, var, gamma, beta, 1e-5), w))


def test_scale_shift_is_the_eval_batchnorm() -> None:
    x = torch.randn(5, 4, dtype=torch.float64)
    mean, var, gamma, beta = _stats(4, seed=7, dtype=torch.float64)
    scale, shift = bn_scale_shift(mean, var, 1e-5, gamma, beta)
    torch.testing.assert_close(x * scale + shift, _bn(x, mean, var, gamma, beta, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_folded_in_float64_then_rounded_once(dtype: torch.dtype) -> None:
    w, b = torch.randn(8, 4, 3, 3).to(dtype), torch.randn(8).to(dtype)
    mean, var, gamma, beta = [t.to(dtype) for t in _stats(8, seed=8)]
    fw, fb = fold_bn_after(w, b, mean, var, 1e-5, gamma, beta)
    assert fw.dtype == dtype and fb.dtype == dtype
    scale, shift = bn_scale_shift(mean, var, 1e-5, gamma, beta)
    assert torch.equal(fw, (w.double() * scale.reshape(-1, 1, 1, 1)).to(dtype))
    assert torch.equal(fb, (b.double() * scale + shift).to(dtype))


def test_memory_format_and_device_preserved() -> None:
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    mean, var, gamma, beta = _stats(8, seed=9)
    fw, fb = fold_bn_after(w, None, mean, var, 1e-5, gamma, beta)
    assert fw.is_contiguous(memory_format=torch.channels_last) and not fw.is_contiguous()
    assert fw.device == w.device and fb.shape == (8,) and fb.dtype == w.dtype


def test_channel_mismatch_is_refused() -> None:
    mean, var, gamma, beta = _stats(5)
    with pytest.raises(ValueError, match="5 channels"):
        fold_bn_after(torch.randn(8, 4, 3, 3), None, mean, var, 1e-5, gamma, beta)
    with pytest.raises(ValueError, match="5 channels"):
        fold_bn_before(torch.randn(8, 4, 3, 3), None, mean, var, 1e-5, gamma, beta)
