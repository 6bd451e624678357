"""Property tests: random conv / transposed conv / linear geometries fold exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnfold import count_batchnorm, fold

# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
hypothesis = pytest.importorskip("hypothesis")
given, settings = hypothesis.given, hypothesis.settings
st = pytest.importorskip("hypothesis.strategies")

CONV = {1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
        2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
        3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _randomize(bn: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.rand(n, generator=g) * 2 - 1)  # negative gammas too
            bn.bias.copy_(torch.rand(n, generator=g) * 2 - 1)


def _assert_folds(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, seed: int) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomize(m, seed)
    model = model.to(dtype).eval()
    x = x.to(dtype)
    folded, report = fold(model)
    assert count_batchnorm(folded) == 0, str(report)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    assert err <= TOL[dtype], (err, str(report))


geometry = dict(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    bias=st.booleans(),
    affine=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=30, deadline=None)
@given(padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]), **geometry)
def test_conv_bn_folds_exactly(dims, groups, per_group_in, per_group_out, kernel, stride, dilation, padding,
                               bias, affine, dtype, seed, padding_mode) -> None:
    conv_t, _, bn_t = CONV[dims]
    cin, cout = groups * per_group_in, groups * per_group_out
    size = 2 * padding + dilation * (kernel - 1) + 3  # reflect needs padding < size
    conv = conv_t(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  bias=bias, padding_mode=padding_mode)
    model = nn.Sequential(conv, bn_t(cout, affine=affine))
    _assert_folds(model, torch.randn(2, cin, *([size] * dims)), dtype, seed)


@settings(max_examples=30, deadline=None)
@given(output_padding=st.integers(0, 2), **geometry)
def test_conv_transpose_bn_folds_exactly(dims, groups, per_group_in, per_group_out, kernel, stride, dilation,
                                         padding, bias, affine, dtype, seed, output_padding) -> None:
    _, tconv_t, bn_t = CONV[dims]
    output_padding = min(output_padding, max(stride, dilation) - 1)  # must be < stride or dilation
    cin, cout = groups * per_group_in, groups * per_group_out
    tconv = tconv_t(cin, cout, kernel, stride=stride, padding=min(padding, dilation * (kernel - 1)),
                    output_padding=output_padding, dilation=dilation, groups=groups, bias=bias)
    model = nn.Sequential(tconv, bn_t(cout, affine=affine))
    _assert_folds(model, torch.randn(2, cin, *([3] * dims)), dtype, seed)


@settings(max_examples=25, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), per_group_in=st.integers(1, 3),
       per_group_out=st.integers(1, 3), kernel=st.integers(1, 3), stride=st.integers(1, 2),
       padding_mode=st.sampled_from(["reflect", "replicate", "circular"]), padding=st.integers(0, 1),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_bn_before_conv_folds_exactly(dims, groups, per_group_in, per_group_out, kernel, stride, padding_mode,
                                      padding, bias, dtype, seed) -> None:
    conv_t, _, bn_t = CONV[dims]
    cin, cout = groups * per_group_in, groups * per_group_out
    model = nn.Sequential(nn.ReLU(), bn_t(cin), nn.Dropout(),
                          conv_t(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=bias,
                                 padding_mode=padding_mode))
    _assert_folds(model, torch.randn(2, cin, *([kernel + 3] * dims)), dtype, seed)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), features=st.integers(1, 16), out=st.integers(1, 16), bias=st.booleans(),
       affine=st.booleans(), before=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_linear_bn_folds_exactly(batch, features, out, bias, affine, before, dtype, seed) -> None:
    linear = nn.Linear(features, out, bias=bias)
    if before:
        model = nn.Sequential(nn.Tanh(), nn.BatchNorm1d(features, affine=affine), linear)
    else:
        model = nn.Sequential(linear, nn.BatchNorm1d(out, affine=affine))
    _assert_folds(model, torch.randn(batch, features), dtype, seed)
