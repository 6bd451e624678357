"""BatchNorm-like modules beyond torch's: frozen BNs, a tutorial's own class, a declared class, and
the graph patterns around them (metadata reads, concatenated convs, pools, flatten(0, 1))."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from bnfold import count_batchnorm, fold
from bnfold.adapters import BNStats
from bnfold.errors import BnfoldError


def _check(model: nn.Module, x: torch.Tensor, randomize_bn, rel_err, *, left: int = 0, tol: float = 1e-5,
           **kwargs):
    model = randomize_bn(model).eval()
    with torch.no_grad():
        ref = model(x)
    folded, report = fold(model, **kwargs)
    with torch.no_grad():
        assert rel_err(ref, folded(x)) <= tol, report
    assert count_batchnorm(folded, batchnorms=kwargs.get("batchnorms")) == left, str(report)
    names = [n for n, _ in report.skipped]
    assert len(names) == len(set(names)) and len(names) >= left, str(report)  # each left one, once
    assert report.ok == (not report.skipped)
    return folded, report


class TutorialBatchNorm(nn.Module):
    """What a BN tutorial has students write: gamma/beta parameters, statistics as plain tensors."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))
        self.running_mean = torch.zeros(num_features)
        self.running_var = torch.ones(num_features)
        self.eps, self.momentum = eps, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            axes = [0] + list(range(2, x.dim()))
            mean, var = x.mean(axes), x.var(axes, unbiased=False)
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean.detach()
            self.running_var = (1 - self.momentum) * self.running_var + self.momentum * var.detach()
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        return self.gamma.reshape(shape) * x_hat + self.beta.reshape(shape)


class NotQuiteBatchNorm(TutorialBatchNorm):
    """Looks like a BN by its attributes, but its eval output is clamped: must not be folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp(min=-1.0)


def test_tutorial_batchnorm_class_is_verified_and_folded(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), TutorialBatchNorm(6), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 25, 4), TutorialBatchNorm(4))
    assert count_batchnorm(model) == 2
    folded, report = _check(model, torch.randn(2, 3, 5, 5), randomize_bn, rel_err)
    assert report.folded == [("0", "1"), ("4", "5")]


def test_batchnorm_lookalike_that_computes_something_else_is_left_with_the_reason(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), NotQuiteBatchNorm(6))
    _, report = _check(model, torch.randn(2, 3, 5, 5), randomize_bn, rel_err, left=1, tol=0)
    [(name, reason)] = report.skipped
    assert name == "1" and "does not compute gamma" in reason and "batchnorms=" in reason


def test_declared_batchnorm_class(randomize_bn, rel_err) -> None:
    class Scaled(nn.Module):
        """A per-channel map no probe would recognize: the caller declares it."""

        def __init__(self, n: int) -> None:
            super().__init__()
            self.register_buffer("s", torch.rand(n) + 0.5)
            self.register_buffer("t", torch.randn(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s[:, None, None] + self.t[:, None, None]

    def adapter(m: Scaled) -> BNStats:
        # scale * x + shift == BN with mean -shift/scale, var 1 - eps, gamma scale, beta 0.
        eps = 1e-5
        return BNStats(-m.t / m.s, torch.full_like(m.s, 1 - eps), eps, m.s, None)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scaled(4))
    assert count_batchnorm(model) == 0
    _, report = _check(model, torch.randn(2, 3, 5, 5), randomize_bn, rel_err, batchnorms={Scaled: adapter})
    assert report.folded == [("0", "1")]
    with pytest.raises(BnfoldError, match="batchnorms"):
        fold(model, batchnorms={"Scaled": adapter})  # type: ignore[dict-item]


def test_frozen_batchnorm_is_folded_and_never_silently_left(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(), FrozenBatchNorm2d(4))
    assert count_batchnorm(model) == 2
    _, report = _check(model, torch.randn(2, 3, 5, 5), randomize_bn, rel_err, left=1, tol=1e-6)
    assert report.folded == [("0", "1")] and [n for n, _ in report.skipped] == ["3"]
    assert not report.ok


class _ShapeAssert(nn.Module):
    """Reads of the conv output's shape, rank and dtype (timm asserts on x.ndim) beside the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4-D input")
        n, c = y.shape[0], y.size(1)
        return self.bn(y).reshape(n, c, -1).mean(-1).to(y.dtype) + y.dim()


def test_metadata_reads_are_not_second_consumers(randomize_bn, rel_err) -> None:
    _, report = _check(_ShapeAssert(), torch.randn(2, 3, 6, 6), randomize_bn, rel_err)
    assert report.folded == [("conv", "bn")]


class _Mixed(nn.Module):
    """timm's MixedConv2d: split channels, one conv per group, concatenate, then one BN."""

    def __init__(self, cat_dim: int = 1) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 5, 5, padding=2, bias=False)])
        self.bn = nn.BatchNorm2d(8)
        self.cat_dim = cat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, 2, 1)
        return self.bn(torch.cat([c(parts[i]) for i, c in enumerate(self.convs)], self.cat_dim))


def test_batchnorm_after_cat_of_convs_is_split_between_them(randomize_bn, rel_err) -> None:
    _, report = _check(_Mixed(), torch.randn(2, 4, 6, 6), randomize_bn, rel_err)
    assert report.folded == [("convs.0, convs.1", "bn")]


def test_cat_whose_conv_output_is_reused_is_refused() -> None:
    class Reused(_Mixed):
        def forward(self, x):
            a, b = self.convs[0](x[:, :2]), self.convs[1](x[:, 2:])
            return self.bn(torch.cat([a, b], 1)), a
    _, report = fold(Reused())
    [(name, reason)] = report.skipped
    assert name == "bn" and "2 users" in reason


class _Pooled(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.conv, self.pool, self.bn = nn.Conv2d(3, 4, 3), pool, nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.pool(self.conv(x)))


@pytest.mark.parametrize("pool, folds", [
    (nn.AvgPool2d(2), True),
    (nn.AdaptiveAvgPool2d(1), True),
    (nn.AvgPool2d(2, padding=1), False),  # border windows average in zeros the BN never shifted
    (nn.MaxPool2d(2), False),  # max does not commute with a negative scale
])
def test_batchnorm_through_average_pool(pool: nn.Module, folds: bool, randomize_bn, rel_err) -> None:
    _, report = _check(_Pooled(pool), torch.randn(2, 3, 9, 9), randomize_bn, rel_err, left=0 if folds else 1,
                       tol=1e-5 if folds else 1e-6)
    assert bool(report.folded) == folds


class _LinearNorm(nn.Module):
    """timm's levit LinearNorm: BatchNorm1d over the tokens of all images at once."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_batchnorm1d_on_flattened_linear_tokens(randomize_bn, rel_err) -> None:
    _, report = _check(_LinearNorm(), torch.randn(2, 7, 6), randomize_bn, rel_err)
    assert report.folded == [("linear", "bn")]


def test_functional_batch_norm_reported_under_its_owning_module() -> None:
    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(torch.relu(x), self.mean, self.var, training=False)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.stats = nn.Conv2d(3, 4, 1), Owner()

        def forward(self, x):
            return self.stats(self.conv(x))
    _, report = fold(M())
    [(name, reason)] = report.skipped
    assert name == "stats (F.batch_norm)" and "relu" in reason


def test_batchnorm_before_average_pool_folds_into_the_following_conv(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.AvgPool2d(2), nn.Conv2d(3, 4, 3))
    _, report = _check(model, torch.randn(2, 3, 10, 10), randomize_bn, rel_err)
    assert report.folded == [("3", "1")]


def test_cat_along_another_axis_is_refused(randomize_bn, rel_err) -> None:
    model = _Mixed(cat_dim=2)
    model.convs[1] = nn.Conv2d(2, 3, 5, padding=2, bias=False)
    model.bn = nn.BatchNorm2d(3)
    _, report = _check(model, torch.randn(2, 4, 6, 6), randomize_bn, rel_err, left=1, tol=1e-6)
    assert "axis 2" in report.skipped[0][1]


@pytest.mark.gpu
def test_tutorial_batchnorm_on_cuda_is_probed_on_the_cpu(randomize_bn, rel_err) -> None:
    bn = TutorialBatchNorm(4)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), bn)).eval().cuda()
    bn.running_mean, bn.running_var = bn.running_mean.cuda(), bn.running_var.cuda()  # plain tensors
    x = torch.randn(2, 3, 6, 6, device="cuda")
    folded, report = fold(model)
    assert report.folded == [("0", "1")] and folded[0].weight.device.type == "cuda"
    with torch.no_grad():
        assert rel_err(model(x).cpu(), folded(x).cpu()) <= 1e-5
