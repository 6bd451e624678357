"""bnfold.fold on modules: every supported pattern, every guard, what must be preserved."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold import FoldReport, count_batchnorm, fold
from bnfold.patterns import DEFAULT_FOLDERS, FoldSkipped, fold_bn_after_layer


def _check(model: nn.Module, x: torch.Tensor, randomize_bn, rel_err, *, left: int = 0, tol: float = 1e-5):
    model = randomize_bn(model).eval()
    with torch.no_grad():
        ref = model(x)
    folded, report = fold(model)
    with torch.no_grad():
        out = folded(x)
    assert rel_err(ref, out) <= tol, report
    assert count_batchnorm(folded) == left, str(report)
    return folded, report


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_every_dimension(dims: int, bias: bool, randomize_bn, rel_err) -> None:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    model = nn.Sequential(conv(4, 6, 3, stride=2, padding=1, bias=bias), bn(6), nn.ReLU(),
                          conv(6, 6, 3, groups=6, dilation=2, padding=2, padding_mode="reflect"), bn(6))
    x = torch.randn(2, 4, *([7] * dims))
    folded, report = _check(model, x, randomize_bn, rel_err)
    assert report.folded == [("0", "1"), ("3", "4")]
    assert folded[0].bias is not None


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_grouped_with_output_padding(dims: int, randomize_bn, rel_err) -> None:
    tconv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    model = nn.Sequential(tconv(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False), bn(6))
    _check(model, torch.randn(2, 4, *([4] * dims)), randomize_bn, rel_err)


def test_linear_bn_and_affine_false(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(),
                          nn.Linear(8, 4, bias=False), nn.BatchNorm1d(4))
    _, report = _check(model, torch.randn(5, 10), randomize_bn, rel_err)
    assert len(report.folded) == 2 and report.ok


def test_bn_before_linear_through_dropout(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(10), nn.Dropout(0.5), nn.Identity(), nn.Linear(10, 3))
    _, report = _check(model, torch.randn(6, 10), randomize_bn, rel_err)
    assert report.folded == [("4", "1")]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_before_conv_with_value_padding(mode: str, randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode=mode))
    _, report = _check(model, torch.randn(2, 4, 6, 6), randomize_bn, rel_err)
    assert report.folded == [("2", "1")]


def test_bn_before_unpadded_grouped_conv(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Dropout2d(), nn.Conv2d(4, 6, 3, groups=2))
    _check(model, torch.randn(2, 4, 6, 6), randomize_bn, rel_err)


def test_bn_before_zero_padded_conv_is_left_and_reported(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1))
    _, report = _check(model, torch.randn(2, 4, 6, 6), randomize_bn, rel_err, left=1, tol=1e-6)
    assert report.folded == []
    [(name, reason)] = report.skipped
    assert name == "1" and "zero-padded" in reason


class _Functional(nn.Module):
    """A forward calling F.batch_norm on its own buffers and parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.register_buffer("mean", torch.rand(5))
        self.register_buffer("var", torch.rand(5) + 0.5)
        self.gamma = nn.Parameter(torch.rand(5) + 0.5)
        self.beta = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, training=self.training, eps=1e-3)
        return torch.relu(y)


def test_functional_batch_norm(rel_err) -> None:
    model = _Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model)
    assert isinstance(folded, torch.fx.GraphModule)
    assert report.folded == [("conv", "batch_norm (F.batch_norm)")]
    assert not any(n.target is F.batch_norm for n in folded.graph.nodes)
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) <= 1e-5


def test_functional_batch_norm_inplace_leaves_a_working_model(rel_err) -> None:
    # The model's own forward still calls F.batch_norm, so its conv must not be folded under it.
    model = _Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    folded, report = fold(model, inplace=True)
    assert report.folded == [("conv", "batch_norm (F.batch_norm)")]
    with torch.no_grad():
        assert rel_err(ref, folded(x)) <= 1e-5
        assert torch.equal(model(x), ref)


class _TwoConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is needed unnormalized too


def test_guard_second_consumer(randomize_bn, rel_err) -> None:
    # torch.ao.quantization.fuse_modules folds this and returns wrong outputs.
    _, report = _check(_TwoConsumers(), torch.randn(2, 3, 5, 5), randomize_bn, rel_err, left=1, tol=1e-6)
    [(name, reason)] = report.skipped
    assert name == "bn" and "2 users" in reason and "add" in reason


def test_guard_no_running_stats(rel_err) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(4, 3, 6, 6)
    folded, report = fold(model)
    assert count_batchnorm(folded) == 1
    assert "track_running_stats=False" in report.skipped[0][1]
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


def test_guard_shape_mismatch(randomize_bn) -> None:
    # Never runnable as is, but fold must refuse rather than crash or fold garbage.
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(6)))
    folded, report = fold(model)
    assert count_batchnorm(folded) == 1
    assert "shapes disagree" in report.skipped[0][1] and "4 channels" in report.skipped[0][1]
    with pytest.raises(FoldSkipped, match="shapes disagree"):
        fold_bn_after_layer(nn.Linear(3, 4), nn.BatchNorm1d(5))


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(self.bn1(self.conv(x))))


def test_guard_layer_called_twice(randomize_bn, rel_err) -> None:
    _, report = _check(_Shared(), torch.randn(1, 3, 5, 5), randomize_bn, rel_err, left=2, tol=1e-6)
    assert {n for n, _ in report.skipped} == {"bn1", "bn2"}
    assert all("called 2 times" in r or "zero-padded" in r for _, r in report.skipped)


def test_guard_bn_called_twice(randomize_bn, rel_err) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))
    _, report = _check(M(), torch.randn(1, 3, 4, 4), randomize_bn, rel_err, left=1, tol=1e-6)
    assert "called 2 times" in report.skipped[0][1]


def test_guard_tied_weights(randomize_bn, rel_err) -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.BatchNorm1d(4), b)
    _, report = _check(model, torch.randn(3, 4), randomize_bn, rel_err, left=1, tol=1e-6)
    assert "shared" in report.skipped[0][1]


class _DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.block = _TwoConsumers()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if y.mean() > 0:
            y = self.block(y[:, :3])
        return self.bn(self.conv(y))


def test_fx_fallback_on_data_dependent_control_flow(randomize_bn, rel_err) -> None:
    model = _DataDependent()
    x = torch.randn(2, 3, 8, 8)
    folded, report = _check(model, x, randomize_bn, rel_err, left=2, tol=1e-5)
    assert type(folded) is _DataDependent
    assert ("features.0", "features.1") in report.folded
    skipped = dict(report.skipped)
    assert "2 users" in skipped["block.bn"]  # traced on its own: the guard still works inside
    assert "cannot be traced by FX" in skipped["bn"]
    assert any("FX could not trace the model" in n for n in report.notes)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                                  nn.Dropout(), nn.Conv2d(4, 2, 1), _Branchy(), nn.BatchNorm2d(2))

    def forward(self, x):
        return self.body(x)


class _Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_sequential_walk_when_a_child_is_untraceable(randomize_bn, rel_err) -> None:
    folded, report = _check(_Untraceable(), torch.randn(2, 3, 6, 6), randomize_bn, rel_err, left=1)
    assert ("body.0", "body.1") in report.folded and ("body.5", "body.3") in report.folded
    assert [n for n, _ in report.skipped] == ["body.7"]


def test_input_untouched_result_eval_and_inplace(randomize_bn) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    before = copy.deepcopy(model.state_dict())
    folded, _ = fold(model)
    assert model.training and count_batchnorm(model) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not folded.training and not any(m.training for m in folded.modules())
    same, _ = fold(model, inplace=True)
    assert same is model and count_batchnorm(model) == 0 and not model.training


def test_dtype_requires_grad_and_channels_last_preserved(randomize_bn, rel_err) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))).double().eval()
    model = model.to(memory_format=torch.channels_last)
    model[0].weight.requires_grad_(False)
    folded, _ = fold(model)
    w, b = folded[0].weight, folded[0].bias
    assert w.dtype == b.dtype == torch.float64
    assert not w.requires_grad and not b.requires_grad
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_folds_as_well_as_the_model_computes(dtype: torch.dtype, randomize_bn) -> None:
    """Folding in float64 and rounding once: compared with a float64 reference the folded
    low-precision model is close to the unfolded one's own error and clearly better than
    folding in the storage dtype (what torch.fx's fuse does)."""
    from torch.fx.experimental.optimization import fuse
    ratios_unfolded, ratios_naive = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8))
        model = randomize_bn(model, seed=seed).eval()
        x = torch.randn(8, 3, 12, 12)
        with torch.no_grad():
            ref = copy.deepcopy(model).double()(x.double())
            low = copy.deepcopy(model).to(dtype)
            folded, report = fold(low)
            assert report.ok and folded[0].weight.dtype == dtype
            rms = lambda m: ((m(x.to(dtype)).double() - ref) ** 2).mean().sqrt().item()  # noqa: E731
            ours = rms(folded)
            ratios_unfolded.append(ours / rms(low))
            ratios_naive.append(ours / rms(fuse(copy.deepcopy(low))))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(ratios_unfolded) <= 1.3, ratios_unfolded
    assert mean(ratios_naive) < 1.0, ratios_naive


def test_conv_subclass_that_keeps_forward_is_folded(randomize_bn, rel_err) -> None:
    # torchvision's Conv3DSimple is such a subclass (r3d_18, mc3_18): only __init__ differs.
    class Plain(nn.Conv2d):
        pass

    _, report = _check(nn.Sequential(Plain(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(1, 3, 5, 5), randomize_bn,
                       rel_err)
    assert report.folded == [("0", "1")]


def test_extending_and_overriding_the_table(randomize_bn, rel_err) -> None:
    class MyConv(nn.Conv2d):
        """Its own forward: never folded unless the caller says how (here: the default fold is exact,
        the doubled weight scales with the folded one)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight * 2, self.bias)

    model = nn.Sequential(MyConv(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    x = torch.randn(1, 3, 5, 5)
    _, report = _check(copy.deepcopy(model), x, randomize_bn, rel_err, left=1)
    assert "its input comes from conv2d, not a layer module" in report.skipped[0][1]  # traced through
    folders = {(MyConv, nn.BatchNorm2d): fold_bn_after_layer, (nn.Conv2d, nn.BatchNorm2d): None}
    folded, report = fold(randomize_bn(model).eval(), folders=folders)
    assert report.folded == [("0", "1")] and [n for n, _ in report.skipped] == ["3"]
    assert (nn.Conv2d, nn.BatchNorm2d) in DEFAULT_FOLDERS  # the global table is untouched
    with pytest.raises(bnfold.BnfoldError, match="pairs"):
        fold(model, folders={nn.Conv2d: fold_bn_after_layer})


def test_report_table_and_dict(randomize_bn) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    _, report = fold(randomize_bn(model))
    text = str(report)
    assert text.splitlines()[0] == "BatchNorm fold: 1 folded, 1 skipped"
    assert "folded" in text and "skipped" in text and "track_running_stats=False" in text
    data = report.to_dict()
    assert data["folded"] == [{"layer": "0", "batchnorm": "1"}]
    assert data["skipped"][0]["batchnorm"] == "2"
    assert isinstance(report, FoldReport)


def test_unused_batchnorm_is_reported() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.spare = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(x)
    _, report = fold(M())
    assert report.skipped == [("spare", "never called in the traced forward")]


def test_not_a_module_and_torchscript_are_refused() -> None:
    with pytest.raises(bnfold.BnfoldError, match="nn.Module"):
        fold("model.pt")  # type: ignore[arg-type]
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)))
    with pytest.raises(bnfold.BnfoldError, match="TorchScript"):
        fold(scripted)


def test_sync_batchnorm_in_eval_folds(randomize_bn, rel_err) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU(),
                          nn.ConvTranspose2d(4, 2, 2, stride=2), nn.SyncBatchNorm(2))
    _, report = _check(model, torch.randn(2, 3, 6, 6), randomize_bn, rel_err)
    assert report.folded == [("0", "1"), ("3", "4")]


@pytest.mark.gpu
def test_cuda_model_stays_on_cuda(randomize_bn, rel_err) -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4))).eval().cuda()
    folded, report = fold(model)
    assert report.ok and all(p.device.type == "cuda" for p in folded.parameters())
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        assert rel_err(model(x).cpu(), folded(x).cpu()) <= 1e-5


def test_guard_layer_with_hooks(randomize_bn, rel_err) -> None:
    # weight_norm's pre-hook recomputes conv.weight from weight_g / weight_v on every call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    _, report = _check(nn.Sequential(conv, nn.BatchNorm2d(4)), torch.randn(1, 3, 5, 5), randomize_bn, rel_err,
                       left=1, tol=1e-6)
    assert "forward hooks" in report.skipped[0][1] and "weight_norm" in report.skipped[0][1]


def test_lazy_modules_are_refused_as_lazy() -> None:
    # A lazy module carries an initializing pre-hook: the reason must name the laziness.
    with pytest.raises(FoldSkipped, match="lazy and not initialized"):
        fold_bn_after_layer(nn.LazyConv2d(4, 1), nn.BatchNorm2d(4))
    with pytest.raises(FoldSkipped, match="lazy and not initialized"):
        fold_bn_after_layer(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())


class _OpaqueChild(nn.Module):
    """Its own forward traces; one child's (data-dependent control flow) does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.branchy = nn.Sequential(_Branchy(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.branchy(self.bn1(self.conv1(x))))


def test_untraceable_child_is_kept_whole_and_its_parent_still_folds(randomize_bn, rel_err) -> None:
    folded, report = _check(_OpaqueChild(), torch.randn(2, 3, 6, 6), randomize_bn, rel_err, left=1)
    assert ("conv1", "bn1") in report.folded and ("branchy.1", "branchy.2") in report.folded
    [(name, reason)] = report.skipped
    assert name == "bn2" and "branchy (Sequential)" in reason
    assert any("branchy kept whole" in n for n in report.notes)
