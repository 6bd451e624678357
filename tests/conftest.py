"""Suite-wide settings: deterministic, two-core friendly, GPU tests skipped with a reason."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import onnx
import pytest
import torch
from torch import nn

from bnfold.models.spec import SPEC_METADATA_KEY, ModelSpec, Preprocess
from bnfold.serve.launch import free_port as _free_port
from bnfold.bench.zoo import randomize_batchnorm

# CI has 2 cores; torch's default pool fights pytest, onnxruntime and the HTTP server for them.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    reason = "needs a CUDA device: torch.cuda.is_available() is False on this machine"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random running mean/var and gamma/beta in every BatchNorm(-like) module of `model`, in place.

    A fresh BatchNorm is the identity in eval mode (mean 0, var 1, gamma 1, beta 0), so folding
    it proves nothing: every test that checks a fold or an export randomizes these first. The
    zoo (`python -m bnfold.bench.zoo`) uses the same function.
    """
    return randomize_batchnorm(model, seed)


def max_rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |candidate - reference| / max |reference| in float64: the figure every tolerance is stated in."""
    reference, candidate = reference.double(), candidate.double()
    return float((candidate - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="session")
def rel_err() -> Callable[[torch.Tensor, torch.Tensor], float]:
    """`rel_err(reference, candidate)`: `max_rel_error`, for the fold and export tests."""
    return max_rel_error


@pytest.fixture(scope="session")
def randomize_bn():
    """`randomize_bn(model, seed=0) -> model`: random BN statistics and affine parameters, in place."""
    return _randomize_bn


# Serving and bench fixture models: a tiny randomized ONNX classifier (no training) and a LeNet
# trained briefly on the bundled digits with its exported file. Session-scoped: built once.
def tiny_spec(in_channels: int = 1, size: int = 28, classes: int = 10) -> ModelSpec:
    return ModelSpec(arch="tiny", arch_kwargs={}, task="classification", input_shape=[in_channels, size, size],
                     preprocess=Preprocess(mode="L" if in_channels == 1 else "RGB", resize=size, crop=[size, size],
                                           mean=[0.5] * in_channels, std=[0.25] * in_channels),
                     labels=[str(i) for i in range(classes)], dataset="synthetic")


def write_tiny_onnx(path: Path, *, seed: int = 0, in_channels: int = 1, size: int = 28, classes: int = 10,
                    spec: ModelSpec | None = None) -> Path:
    """A small conv+BN+linear classifier with random BN statistics, exported with the spec metadata."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, classes))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(1, in_channels, size, size)
    with warnings.catch_warnings():  # the legacy exporter is deprecated, and quick for a 6-layer net
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = SPEC_METADATA_KEY
    entry.value = (spec or tiny_spec(in_channels, size, classes)).to_json()
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="session")
def make_tiny_onnx() -> Callable[..., Path]:
    """`write_tiny_onnx(path, *, seed, in_channels, size, classes, spec)` for tests that need several."""
    return write_tiny_onnx


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx")


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_port()


@pytest.fixture(scope="session")
def trained_lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet-BN trained for 2 short epochs on the bundled digits: enough to label digits."""
    from bnfold import models

    out = tmp_path_factory.mktemp("lenet_run")
    result = models.train(models.TrainConfig(model="lenet", dataset="digits", epochs=2, out=str(out),
                                             device="cpu", seed=0, progress=False))
    return Path(result.best)


@pytest.fixture(scope="session")
def lenet_onnx(trained_lenet_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained LeNet exported (BN folded) to model.onnx with the spec in its metadata."""
    from bnfold import export
    from bnfold import models

    model, spec = models.load_checkpoint(trained_lenet_checkpoint)
    path = tmp_path_factory.mktemp("lenet_export") / "model.onnx"
    export.export_onnx(model, spec, path)
    return path
