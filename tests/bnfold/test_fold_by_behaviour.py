"""BatchNorm recognized by what it computes: Dive into Deep Learning's from-scratch BatchNorm in its
sigmoid/AvgPool LeNet, saved whole as a reader of the course would, folded and exported from the
command line; per-channel maps of other names folded; look-alikes that are not maps reported."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from bnfold import cli, count_batchnorm, fold
from bnfold.adapters import BNStats

# The course's code as it prints it (d2l.ai, "Batch Normalization", PyTorch tab), plus a builder.
D2L_SOURCE = '''
import torch
from torch import nn


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    # Use is_grad_enabled to determine whether we are in training mode
    if not torch.is_grad_enabled():
        # In prediction mode, use mean and variance obtained by moving average
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        assert len(X.shape) in (2, 4)
        if len(X.shape) == 2:
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
        moving_var = (1.0 - momentum) * moving_var + momentum * var
    Y = gamma * X_hat + beta  # Scale and shift
    return Y, moving_mean.data, moving_var.data


class BatchNorm(nn.Module):
    def __init__(self, num_features, num_dims):
        super().__init__()
        if num_dims == 2:
            shape = (1, num_features)
        else:
            shape = (1, num_features, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, X):
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        Y, self.moving_mean, self.moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean,
            self.moving_var, eps=1e-5, momentum=0.1)
        return Y


def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), BatchNorm(6, num_dims=4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), BatchNorm(16, num_dims=4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), BatchNorm(120, num_dims=2), nn.Sigmoid(),
        nn.Linear(120, 84), BatchNorm(84, num_dims=2), nn.Sigmoid(),
        nn.Linear(84, 10))


def read_bn(module):
    import bnfold
    flat = lambda t: t.detach().reshape(-1)
    return bnfold.BNStats(flat(module.moving_mean), flat(module.moving_var), 1e-5, flat(module.gamma),
                          flat(module.beta))
'''


@pytest.fixture
def d2l(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The course's module as a user's file `d2l_bn.py` in the working folder, imported from there."""
    (tmp_path / "d2l_bn.py").write_text(D2L_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "d2l_bn", raising=False)
    import d2l_bn

    yield d2l_bn
    sys.modules.pop("d2l_bn", None)


def _trained_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Moving statistics far from the identity, as the course's training leaves them (random,
    not trained: the fold must not depend on which values they hold)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if hasattr(m, "moving_mean"):
            shape = m.moving_mean.shape
            m.moving_mean = torch.rand(shape, generator=g) * 2 - 1
            m.moving_var = torch.rand(shape, generator=g) * 1.5 + 0.25
            with torch.no_grad():
                m.gamma.copy_(torch.rand(shape, generator=g) + 0.5)
                m.beta.copy_(torch.rand(shape, generator=g) * 2 - 1)
    return net.eval()


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def test_d2l_lenet_saved_whole_is_folded_by_the_cli(d2l, tmp_path: Path, capsys) -> None:
    net = _trained_statistics(d2l.lenet())
    torch.save(net, tmp_path / "lenet.pt")
    code = cli.main(["fold", "lenet.pt", "--trust-pickle", "--input-shape", "1,1,28,28", "--out", "folded.pt"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 folded, 0 skipped" in out and "BatchNorm left: 0 of 4" in out
    folded = torch.load(tmp_path / "folded.pt", weights_only=False)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert _max_rel(net(x), folded(x)) <= 1e-5
    assert not any(isinstance(m, d2l.BatchNorm) for m in folded.modules())


def test_d2l_lenet_without_example_inputs_is_reported_not_silently_left(d2l) -> None:
    net = _trained_statistics(d2l.lenet())
    _, report = fold(net)
    assert [n for n, _ in report.skipped] == ["1", "5", "10", "13"] and not report.folded
    assert all("moving_mean" in why and "example" in why for _, why in report.skipped), str(report)
    assert count_batchnorm(net) == 4


def test_d2l_lenet_folded_whatever_its_statistics_are_called(d2l) -> None:
    """Renamed to running_* (the attribute reader's names), the conv ones' (1, C, 1, 1) tensors must not
    fail the class on a 2-D probe; with the real input they are folded by behaviour anyway."""
    net = _trained_statistics(d2l.lenet())
    for m in net.modules():
        if isinstance(m, d2l.BatchNorm):
            m.running_mean, m.running_var = m.moving_mean, m.moving_var
    x = torch.randn(4, 1, 28, 28)
    folded, report = fold(net, example_inputs=x)
    assert len(report.folded) == 4 and report.ok, str(report)
    with torch.no_grad():
        assert _max_rel(net(x), folded(x)) <= 1e-5


@pytest.mark.slow
def test_d2l_lenet_exports_to_onnx_without_its_arithmetic(d2l, tmp_path: Path, capsys) -> None:
    torch.save(_trained_statistics(d2l.lenet()), tmp_path / "lenet.pt")
    code = cli.main(["export", "lenet.pt", "--trust-pickle", "--input-shape", "1,1,28,28", "--format", "onnx",
                     "--out", "exp", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "4 folded, 0 skipped" in out, out
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "exp" / "model.onnx")).graph.node)
    assert not ops.keys() & {"Sub", "Div", "Mul", "Add", "Sqrt", "BatchNormalization"}, ops
    assert ops["Conv"] == 2 and ops["Sigmoid"] == 4


def test_d2l_lenet_exported_unfolded_runs_its_inference_branch(d2l, tmp_path: Path, capsys) -> None:
    """--no-fold: the exporter traces under no_grad, so the course's batch_norm takes its
    is_grad_enabled() == False branch (traced with grad on, torch.export recorded the training one)."""
    torch.save(_trained_statistics(d2l.lenet()), tmp_path / "lenet.pt")
    code = cli.main(["export", "lenet.pt", "--trust-pickle", "--input-shape", "1,1,28,28", "--format", "program",
                     "--no-fold", "--out", "unfolded", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "unfolded" / "model.pt2").is_file()


def test_batchnorm_class_declared_on_the_command_line(d2l, tmp_path: Path, capsys) -> None:
    """--batchnorm CLASS=ADAPTER: the class is read by the user's adapter, not probed."""
    torch.save(_trained_statistics(d2l.lenet()), tmp_path / "lenet.pt")
    code = cli.main(["fold", "lenet.pt", "--trust-pickle", "--input-shape", "1,1,28,28", "--out", "f.pt",
                     "--batchnorm", "d2l_bn.py:BatchNorm=d2l_bn.py:read_bn"])
    assert code == 0 and "4 folded" in capsys.readouterr().out
    assert cli.main(["fold", "lenet.pt", "--trust-pickle", "--input-shape", "1,1,28,28", "--out", "f.pt",
                     "--batchnorm", "d2l_bn.py:BatchNorm"]) == 2
    err = capsys.readouterr().err
    assert "CLASS=ADAPTER" in err and "Traceback" not in err


class Scale(nn.Module):
    """A per-channel map under names no reader knows: folded once it is seen to be one."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("s", torch.rand(n) + 0.5)
        self.register_buffer("t", torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.t[:, None, None], x, self.s[:, None, None])


class Gate(nn.Module):
    """A per-channel parameter, but not an affine map: neither folded nor reported as a BatchNorm."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x * self.w[:, None, None])


class SampleNorm(nn.Module):
    """Named like a norm, normalizes each sample with its own statistics: reported with why."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = x.mean((1, 2, 3), keepdim=True), x.std((1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-5) * self.weight[:, None, None]


def test_per_channel_maps_are_folded_and_look_alikes_reported() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scale(4), nn.Conv2d(4, 4, 3), Gate(4), nn.Conv2d(4, 4, 1),
                          SampleNorm(4)).eval()
    x = torch.randn(2, 3, 9, 9)
    folded, report = fold(model, example_inputs=x)
    assert report.folded == [("0", "1")]
    [(name, why)] = report.skipped
    assert name == "5" and "not a per-channel affine map" in why, str(report)
    with torch.no_grad():
        assert _max_rel(model(x), folded(x)) <= 1e-5


class TokenNorm(nn.Module):
    """A BatchNorm over axis 1 of (N, L, C) tokens: after a Linear, whose features are the last axis."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean[:, None]) / torch.sqrt(self.running_var[:, None] + self.eps)


def test_batchnorm_over_tokens_is_not_folded_into_a_linear_of_the_same_width() -> None:
    model = nn.Sequential(nn.Linear(5, 5), TokenNorm(5)).eval()
    x = torch.randn(2, 5, 5)
    folded, report = fold(model, example_inputs=x)
    [(name, why)] = report.skipped
    assert name == "1" and "axis 1 of a 3-D input" in why, str(report)
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


@pytest.mark.gpu
def test_d2l_lenet_on_cuda_is_probed_on_the_cpu_and_folded_on_its_device(d2l) -> None:
    net = _trained_statistics(d2l.lenet()).cuda()
    x = torch.randn(4, 1, 28, 28, device="cuda")
    folded, report = fold(net, example_inputs=x)
    assert len(report.folded) == 4 and report.ok, str(report)
    assert all(p.device.type == "cuda" for p in folded.parameters())
    with torch.no_grad():
        assert _max_rel(net(x).cpu(), folded(x).cpu()) <= 1e-5


FLOAT32_BN = '''
import torch
from torch import nn


class Float32BN(nn.Module):
    """Normalizes in float32 whatever it is given (as mixed-precision code does): its float64 probe
    differs from an exact affine map by float32 rounding, so probing cannot settle it."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("mu", torch.linspace(-1, 1, n))
        self.register_buffer("sigma2", torch.linspace(0.5, 2, n))

    def forward(self, x):
        y = (x.float() - self.mu[:, None, None]) / torch.sqrt(self.sigma2[:, None, None] + 1e-5)
        return y.to(x.dtype)


def read(module):
    import bnfold
    return bnfold.BNStats(module.mu, module.sigma2, 1e-5)


def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), Float32BN(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
'''


def test_a_class_probing_cannot_settle_is_declared_for_fold_and_export(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "f32bn.py").write_text(FLOAT32_BN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "f32bn", raising=False)
    import f32bn

    torch.save(f32bn.net().eval(), tmp_path / "net.pt")
    common = ["net.pt", "--trust-pickle", "--input-shape", "1,3,8,8"]
    assert cli.main(["fold", *common, "--out", "a.pt"]) == 0
    out = capsys.readouterr().out
    assert "0 folded, 1 skipped" in out and "not a per-channel affine map" in out and "--batchnorm" in out
    declared = ["--batchnorm", "f32bn.py:Float32BN=f32bn.py:read"]
    assert cli.main(["fold", *common, *declared, "--out", "b.pt"]) == 0
    assert "1 folded, 0 skipped" in capsys.readouterr().out
    assert cli.main(["export", *common, *declared, "--format", "torchscript", "--out", "exp", "--no-progress"]) == 0
    assert "1 folded, 0 skipped" in capsys.readouterr().out
    sys.modules.pop("f32bn", None)
