"""Suite-wide settings: deterministic, two-core friendly, GPU tests skipped with a reason.

How the suite stays fast (issue 20):
- `extended` tests (the deep architectures beyond the one each feature keeps by default, and the
  longest cases) are deselected unless `--extended` is given: the nightly run takes them.
- The ONNX writer runs the legacy (TorchScript-based) exporter in tests not marked `dynamo`:
  about 1 s per export instead of the dynamo exporter's 10 s on two cores. Tests of the dynamo
  exporter itself (its graph, opsets, progress lines) are marked `dynamo` and get it.
- Artifacts several files need (a trained LeNet, its export in every format) are session
  fixtures, built once per run and shared by pytest-xdist's workers (`shared_artifact`).
- Under `-n 2 --dist loadscope` (what `python3 dev.py test` runs) each test module goes to one
  worker as a whole, so its module fixtures (a server, an export) are built once. (Not loadgroup:
  pytest-xdist 3.8 groups by rewriting `item._nodeid`, which pytest 9 no longer reads, so its
  groups are silently ignored and a module's tests are spread over both workers.)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterator

import onnx
import pytest
import torch
from torch import nn

from bnfold.models.spec import SPEC_METADATA_KEY, ModelSpec, Preprocess
from bnfold.serve.launch import free_port as _free_port
from bnfold.bench.zoo import randomize_batchnorm

# CI has 2 cores; torch's default pool fights pytest, onnxruntime and the HTTP server for them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread_after_each_test() -> Iterator[None]:
    """models.train (threads=0: every CPU) and others set torch's thread count and leave it: put it back,
    or every later test in this process (an xdist worker) runs on both cores, against the other worker."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--extended", action="store_true", default=False,
                     help="also run the tests marked extended (the remaining deep architectures and "
                          "the longest cases), and export ONNX with the dynamo exporter in every test: "
                          "the nightly run; without it they are deselected")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--extended"):
        extended = [item for item in items if item.get_closest_marker("extended") is not None]
        if extended:
            config.hook.pytest_deselected(items=extended)
            items[:] = [item for item in items if item.get_closest_marker("extended") is None]
    if torch.cuda.is_available():
        return
    reason = "needs a CUDA device: torch.cuda.is_available() is False on this machine"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


# ---------------------------------------------------------------------------------------------
# The ONNX exporter. bnfold's ONNX writer uses torch's dynamo exporter by default, about 10 s for
# a LeNet on two cores against 1 s for the legacy (TorchScript-based) one. Where the dynamo
# exporter is not what a test checks, the writer is handed the legacy one: the fold, the
# verification, the metadata and the files around it are the same code either way. A test (and
# the module fixtures it sets up) marked `dynamo`, and every test under --extended, gets the real
# choice. The report's `exporter` field still names the exporter that was asked for; no test
# outside `dynamo` reads it.
_DYNAMO = {"allowed": False}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    # The nightly run (--extended) exports with dynamo everywhere, as users do by default.
    _DYNAMO["allowed"] = item.config.getoption("--extended") or item.get_closest_marker("dynamo") is not None
    try:
        return (yield)
    finally:
        _DYNAMO["allowed"] = False


@pytest.fixture(scope="session", autouse=True)
def _legacy_onnx_exporter_unless_marked_dynamo() -> Iterator[None]:
    from bnfold.export import onnx as onnx_writer

    run_exporter = onnx_writer._run_exporter
    legacy_low, legacy_high = onnx_writer.LEGACY_OPSETS

    def exporter(*args, **kwargs):
        # The flag's name has changed before (legacy -> legacy_onnx): fail loudly, never silently.
        key = next((k for k in ("legacy_onnx", "legacy") if k in kwargs), None)
        if key is None:
            raise AssertionError(f"tests/conftest.py: _run_exporter took {sorted(kwargs)}; update the swap")
        opset = kwargs.get("opset")
        if not _DYNAMO["allowed"] and (opset is None or legacy_low <= opset <= legacy_high):
            kwargs[key] = True
        return run_exporter(*args, **kwargs)

    onnx_writer._run_exporter = exporter
    yield
    onnx_writer._run_exporter = run_exporter


# ---------------------------------------------------------------------------------------------
# Artifacts built once per run. Under pytest-xdist every worker is its own process with its own
# session fixtures; `shared_artifact` builds into a folder both workers see, under a file lock,
# so the second worker reuses what the first built. Treat what it returns as read-only.
@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    from filelock import FileLock

    with FileLock(str(path)):
        yield


def shared_artifact(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder) -> path inside folder`, run once per test run whichever worker asks first."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent    # the run's folder, above each worker's own
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with _lock(root / f"shared-{name}.lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)   # a worker that failed half-way
            folder.mkdir()
            result = build(folder)
            done.write_text(json.dumps(str(result.relative_to(folder))))
        return folder / json.loads(done.read_text())


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


@contextlib.contextmanager
def _in_process_service(*serve_args: str | os.PathLike) -> Iterator["httpx.Client"]:
    """The app that `bnfold serve SERVE_ARGS` serves, called in this process: no socket, no uvicorn, no
    second Python starting up. The same argument parsing, config and `create_app`; start-up and
    shutdown through the app's lifespan; requests through Starlette's TestClient (an httpx.Client).
    For what only a real server shows (sockets, uvicorn's limits, signals, other clients) keep
    `bnfold.serve.launch.running_server`."""
    import argparse

    from starlette.testclient import TestClient

    from bnfold.serve.app import create_app
    from bnfold.serve.config import add_arguments, from_args

    parser = argparse.ArgumentParser(prog="bnfold serve")
    add_arguments(parser)
    app = create_app(from_args(parser.parse_args([str(arg) for arg in serve_args])))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture(scope="session")
def in_process_service() -> Callable[..., contextlib.AbstractContextManager]:
    """`with in_process_service(MODEL, "--threads", "1") as client:` an httpx.Client on that app."""
    return _in_process_service


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_port()


# One LeNet-BN trained on the bundled digits for the whole run: 40 optimizer steps (one short epoch,
# seed 0, one thread), a few seconds, enough to label 18 of 20 digits and to leave chance level far
# behind for INT8's accuracy gate. The serve, evaluate, INT8, bench and loader tests all read it; it
# used to be trained five times, once per file.
LENET_TRAINING = dict(model="lenet", dataset="digits", epochs=1, steps_per_epoch=40, device="cpu", seed=0,
                      progress=False, threads=1)
# Every format `bnfold export` writes, from that checkpoint, in one export (as a user runs it).
LENET_FORMATS = "onnx,torchscript,program,fp16,int8"
LENET_FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "program": "model.pt2",
               "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


@pytest.fixture(scope="session")
def trained_lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of `LENET_TRAINING` (metrics.jsonl beside it). Shared: read it, never write beside it."""
    from bnfold import models

    def build(folder: Path) -> Path:
        return Path(models.train(models.TrainConfig(out=str(folder / "run"), **LENET_TRAINING)).best)

    return shared_artifact(tmp_path_factory, "trained-lenet", build)


@pytest.fixture(scope="session")
def lenet_exports(trained_lenet_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder `bnfold export CHECKPOINT --format LENET_FORMATS` wrote (INT8 from 64 calibration
    samples, through its accuracy gate). Shared, read-only: its files are named in LENET_FILES."""
    from bnfold.cli import main

    def build(folder: Path) -> Path:
        out = folder / "export"
        code = main(["export", str(trained_lenet_checkpoint), "--format", LENET_FORMATS, "--out", str(out),
                     "--calibration-samples", "64", "--no-progress"])
        assert code == 0, "bnfold export of the session's trained LeNet failed"
        return out

    return shared_artifact(tmp_path_factory, "lenet-exports", build)


@pytest.fixture(scope="session")
def lenet_onnx(lenet_exports: Path) -> Path:
    """The trained LeNet exported (BN folded) to model.onnx with the spec in its metadata."""
    return lenet_exports / LENET_FILES["onnx"]
