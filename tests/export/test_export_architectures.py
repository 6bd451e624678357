"""Every architecture of the models package, exported to ONNX, TorchScript and torch.export.

One module-scoped export per architecture (the dynamo exporter takes seconds per model on two
cores); each test then checks one property of those files against the unfolded source model.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from torch import nn

import bnfold
from bnfold import export
from bnfold import models
from bnfold.export.onnx import count_ops
from bnfold.models.spec import SPEC_METADATA_KEY, ModelSpec

ARCHS = [
    pytest.param(("lenet", {}), id="lenet"),
    pytest.param(("resnet20", {}), id="resnet20"),
    pytest.param(("unet", {}), id="unet"),
    # resnet20 stands for the deep ones in every run; these two are the nightly run's (--extended).
    pytest.param(("resnet18", {"small_input": True}), id="resnet18", marks=pytest.mark.extended),
    pytest.param(("resnet50", {"small_input": True}), id="resnet50", marks=pytest.mark.extended),
]
PARITY_SAMPLES = 6
# Here the dynamo exporter is under test: every architecture through the exporter users get by
# default (elsewhere the suite swaps in the legacy one, tests/conftest.py).
pytestmark = pytest.mark.dynamo


@dataclass
class Exported:
    model: nn.Module
    spec: ModelSpec
    reports: dict[str, export.ArtifactReport]
    folder: Path
    bn_before: int
    state_before: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=ARCHS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             randomize_bn) -> Exported:
    arch, kwargs = request.param
    model, spec = models.build_for_dataset(arch, "digits", **kwargs)
    model = randomize_bn(model, seed=7).eval()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_before = bnfold.count_batchnorm(model)
    folder = tmp_path_factory.mktemp(f"export-{arch}")
    samples = torch.randn(PARITY_SAMPLES, *spec.input_shape, generator=torch.Generator().manual_seed(3))
    reports = {
        "onnx": export.export_onnx(model, spec, folder / "model.onnx", samples=samples),
        "torchscript": export.export_torchscript(model, spec, folder / "model.ts", samples=samples),
        "program": export.export_program(model, spec, folder / "model.pt2", samples=samples),
    }
    return Exported(model, spec, reports, folder, bn_before, state_before)


def fresh_input(spec: ModelSpec, batch: int, seed: int = 11) -> torch.Tensor:
    return torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(seed))


def expected_output(exported: Exported, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return exported.model(x)


def test_source_model_has_bn_and_is_left_untouched(exported: Exported) -> None:
    assert exported.bn_before > 0, "the test model must contain BatchNorm for the fold to matter"
    assert bnfold.count_batchnorm(exported.model) == exported.bn_before
    for key, value in exported.model.state_dict().items():
        assert torch.equal(value, exported.state_before[key]), key
    assert not exported.model.training


def test_onnx_file_is_folded_named_dynamic_and_valid(exported: Exported) -> None:
    path = exported.folder / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert count_ops(model, "BatchNormalization") == 0
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 0
    assert [i.name for i in model.graph.input] == ["input"]
    expected_out = "mask" if exported.spec.task == "segmentation" else "logits"
    assert [o.name for o in model.graph.output] == [expected_out]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value"), "batch axis must be symbolic"
    assert [d.dim_value for d in dims[1:]] == list(exported.spec.input_shape)
    report = exported.reports["onnx"]
    assert report.fold_report is not None and len(report.fold_report.folded) == exported.bn_before


def test_reported_parity_is_within_fp32_tolerance(exported: Exported) -> None:
    for fmt, report in exported.reports.items():
        assert report.format == fmt
        assert report.path.is_file() and report.size_bytes == report.path.stat().st_size
        assert report.tolerance == export.FP32_RTOL == 1e-5
        assert report.parity.samples == PARITY_SAMPLES
        assert report.parity.max_rel_error <= 1e-5, (fmt, report.parity)
        assert report.parity.top1_agreement == 1.0
        assert report.dtype == "float32" and report.folded and report.dynamic_batch
    # No staging leftovers beside the files.
    assert sorted(p.name for p in exported.folder.iterdir()) == ["model.onnx", "model.pt2", "model.ts"]


def test_onnx_matches_the_unfolded_model_at_other_batch_sizes(exported: Exported, rel_err) -> None:
    session = ort.InferenceSession(str(exported.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = fresh_input(exported.spec, batch)
        out = session.run(None, {"input": x.numpy()})[0]
        assert rel_err(expected_output(exported, x), torch.from_numpy(out)) <= 1e-5


def test_onnx_metadata_round_trips_the_spec(exported: Exported) -> None:
    model = onnx.load(str(exported.folder / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert ModelSpec.from_json(props[SPEC_METADATA_KEY]) == exported.spec
    assert export.read_spec(exported.folder / "model.onnx") == exported.spec
    assert props["bnfold.version"] == metadata.version("bnfold")
    assert json.loads(props[SPEC_METADATA_KEY])["input_shape"] == exported.spec.input_shape
    # The proof travels with the file too (the served page's cards show it): the fold and the parity.
    parity = json.loads(props["bnfold.parity"])
    assert parity["samples"] > 0 and parity["max_rel_error"] <= 1e-4
    fold = json.loads(props["bnfold.fold"])
    assert fold["folded"] > 0 and fold["skipped"] == []


def test_program_loads_and_keeps_a_dynamic_batch(exported: Exported, rel_err) -> None:
    program = torch.export.load(str(exported.folder / "model.pt2"))
    module = program.module()
    for batch in (1, 5):
        x = fresh_input(exported.spec, batch, seed=batch)
        with torch.no_grad():
            assert rel_err(expected_output(exported, x), module(x)) <= 1e-5


# A long-lived interpreter in which bnfold is NOT importable. bnfold is installed (editable) in
# this venv, so its packages are blocked through sys.modules; the loader then answers one
# "TorchScript file, input, expected output" request per line, so torch is imported only once.
_CLEAN_LOADER = textwrap.dedent("""
    import sys
    for name in ("bnfold", "models", "export", "serve"):
        sys.modules[name] = None
    for name in ("bnfold", "models", "export", "serve"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} is still importable")
    import warnings
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(1)
    print("ready", flush=True)
    for line in sys.stdin:
        ts_path, x_path, expected_path = line.rstrip("\\n").split("\\t")
        try:
            module = torch.jit.load(ts_path)
            x = torch.load(x_path, weights_only=True)
            expected = torch.load(expected_path, weights_only=True)
            with torch.no_grad():
                out = module(x)
            rel = float((out.double() - expected.double()).abs().max() / expected.double().abs().max())
            print(f"ok {rel!r} {list(out.shape) == list(expected.shape)}", flush=True)
        except Exception as exc:
            print("error " + f"{type(exc).__name__}: {exc}".replace("\\n", " "), flush=True)
""")


@pytest.fixture(scope="module")
def clean_loader(tmp_path_factory: pytest.TempPathFactory):
    """A function (file, input, expected) -> (relative error, shapes equal), run without bnfold."""
    workdir = tmp_path_factory.mktemp("clean")
    process = subprocess.Popen([sys.executable, "-c", _CLEAN_LOADER], cwd=workdir, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline().strip()
    if first != "ready":
        process.kill()
        pytest.fail(f"clean loader did not start: {first} {process.stderr.read()}")

    def load(ts_path: Path, x: torch.Tensor, expected: torch.Tensor) -> tuple[float, bool]:
        stem = ts_path.parent.name
        torch.save(x, workdir / f"{stem}-x.pt")
        torch.save(expected, workdir / f"{stem}-expected.pt")
        process.stdin.write(f"{ts_path}\t{workdir / f'{stem}-x.pt'}\t{workdir / f'{stem}-expected.pt'}\n")
        process.stdin.flush()
        answer = process.stdout.readline().split()
        assert answer and answer[0] == "ok", " ".join(answer) or process.stderr.read()
        return float(answer[1]), answer[2] == "True"

    yield load
    process.stdin.close()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def test_torchscript_loads_in_a_process_without_bnfold(exported: Exported, clean_loader) -> None:
    x = fresh_input(exported.spec, 3)
    rel, same_shape = clean_loader(exported.folder / "model.ts", x, expected_output(exported, x))
    assert same_shape and rel <= 1e-5


def test_triton_repository_config_parses(exported: Exported, tmp_path: Path, model_config_pb2) -> None:
    spec = exported.spec
    model_dir = export.write_triton_repo(exported.folder / "model.onnx", spec, tmp_path / "repo",
                                         max_batch_size=16)
    assert model_dir == tmp_path / "repo" / spec.arch
    assert (model_dir / "1" / "model.onnx").read_bytes() == (exported.folder / "model.onnx").read_bytes()
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == spec.arch
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, list(spec.input_shape))]
    (output,) = config.output
    assert output.data_type == model_config_pb2.TYPE_FP32
    with torch.no_grad():
        out_shape = list(exported.model(fresh_input(spec, 1)).shape[1:])
    assert list(output.dims) == out_shape
    assert config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    if spec.task == "classification":
        assert output.label_filename == "labels.txt"
        assert (model_dir / "labels.txt").read_text().split() == spec.labels
    # Only the model folder, nothing half-written beside it.
    assert [p.name for p in (tmp_path / "repo").iterdir()] == [spec.arch]
