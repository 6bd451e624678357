"""Options of the writers on LeNet-BN: float16, static batch, the legacy exporter, no fold, opsets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bnfold import export
from bnfold.export.onnx import count_ops, model_opset


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _x(spec, batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(seed))


def test_fp16_onnx_keeps_float32_edges_and_states_its_tolerance(lenet, tmp_path, rel_err) -> None:
    model, spec = lenet
    report = export.export_onnx(model, spec, tmp_path / "model.onnx", fp16=True)
    assert report.dtype == "float16"
    assert report.tolerance == export.FP16_RTOL == 1e-2
    assert report.to_dict()["tolerance"] == {"max_rel_error": 1e-2}
    assert report.parity.max_rel_error <= 1e-2
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in proto.graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert count_ops(proto, "BatchNormalization") == 0
    assert {p.key: p.value for p in proto.metadata_props}["bnfold.weights_dtype"] == "float16"
    x = _x(spec, 4)
    out = _session(tmp_path / "model.onnx").run(None, {"input": x.numpy()})[0]
    assert out.dtype == np.float32
    with torch.no_grad():
        error = rel_err(model(x), torch.from_numpy(out))
    # float16 really is in there (not a float32 file mislabelled), and within the stated tolerance.
    assert 1e-6 < error <= 1e-2


def test_fp16_torchscript_and_program(lenet, tmp_path) -> None:
    model, spec = lenet
    for writer, name in ((export.export_torchscript, "model.ts"), (export.export_program, "model.pt2")):
        report = writer(model, spec, tmp_path / name, fp16=True)
        assert report.dtype == "float16" and report.tolerance == 1e-2
        assert 0 < report.parity.max_rel_error <= 1e-2
    out = torch.export.load(str(tmp_path / "model.pt2")).module()(_x(spec, 2))
    assert out.dtype == torch.float32


def test_static_batch_fixes_batch_one_and_opset_is_honoured(lenet, tmp_path) -> None:
    model, spec = lenet
    report = export.export_onnx(model, spec, tmp_path / "model.onnx", dynamic_batch=False, opset=18)
    assert not report.dynamic_batch and report.parity.max_rel_error <= 1e-5
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert report.opset == 18 == model_opset(proto)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.HasField("dim_value") and dim0.dim_value == 1
    session = _session(tmp_path / "model.onnx")
    assert session.run(None, {"input": _x(spec, 1).numpy()})[0].shape == (1, 10)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"input": _x(spec, 2).numpy()})

    program_report = export.export_program(model, spec, tmp_path / "model.pt2", dynamic_batch=False)
    assert not program_report.dynamic_batch
    module = torch.export.load(str(tmp_path / "model.pt2")).module()
    assert module(_x(spec, 1)).shape == (1, 10)
    with pytest.raises(Exception):
        module(_x(spec, 2))


def test_legacy_exporter_and_opset(lenet, tmp_path) -> None:
    model, spec = lenet
    report = export.export_onnx(model, spec, tmp_path / "model.onnx", legacy_onnx=True, opset=13)
    assert report.exporter == "torch.onnx.export(dynamo=False)"
    assert report.opset == 13 and report.parity.max_rel_error <= 1e-5
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert model_opset(proto) == 13
    assert count_ops(proto, "BatchNormalization") == 0
    assert export.read_spec(proto) == spec


def test_no_fold_legacy_export_is_folded_in_the_graph(lenet, tmp_path) -> None:
    """Without bnfold.fold the legacy exporter leaves Conv/Gemm + BatchNormalization; the writer
    then runs bnfold.fold_onnx and still writes a file without any BatchNormalization."""
    model, spec = lenet
    report = export.export_onnx(model, spec, tmp_path / "model.onnx", fold=False, legacy_onnx=True)
    assert not report.folded and report.fold_report is None
    assert any("fold_onnx" in note for note in report.notes), report.notes
    assert count_ops(onnx.load(str(tmp_path / "model.onnx")), "BatchNormalization") == 0
    assert report.parity.max_rel_error <= 1e-5


def test_no_fold_program_keeps_batchnorm_and_still_matches(lenet, tmp_path) -> None:
    model, spec = lenet
    report = export.export_program(model, spec, tmp_path / "model.pt2", fold=False)
    assert not report.folded and report.parity.max_rel_error <= 1e-5
    graph = str(torch.export.load(str(tmp_path / "model.pt2")).graph)
    assert "batch_norm" in graph
    folded = export.export_program(model, spec, tmp_path / "folded.pt2")
    assert "batch_norm" not in str(torch.export.load(str(folded.path)).graph)


def test_exporter_output_is_kept_off_the_terminal(lenet, tmp_path, capfd) -> None:
    """The dynamo exporter's progress lines are checked in the CLI test; here the legacy exporter
    (which dumps graphs from C++ on fd 2) and torch.jit (deprecation warnings)."""
    model, spec = lenet
    export.export_onnx(model, spec, tmp_path / "b.onnx", legacy_onnx=True)
    export.export_torchscript(model, spec, tmp_path / "c.ts")
    out, err = capfd.readouterr()
    assert "[torch.onnx]" not in out + err
    assert "deprecated" not in out + err
    assert out + err == ""


def test_given_samples_are_used_and_checked(lenet, tmp_path) -> None:
    model, spec = lenet
    samples = _x(spec, 5)
    report = export.export_program(model, spec, tmp_path / "model.pt2", samples=samples)
    assert report.parity.samples == 5 and report.parity_inputs == "5 given samples"
    with pytest.raises(export.ExportError, match=r"\[5, 3, 28, 28\]"):
        export.export_program(model, spec, tmp_path / "bad.pt2", samples=torch.zeros(5, 3, 28, 28))
    assert not (tmp_path / "bad.pt2").exists()


@pytest.mark.gpu
def test_a_model_on_cuda_exports_to_cpu_files_and_stays_on_cuda(lenet, tmp_path, rel_err) -> None:
    import copy

    model, spec = lenet
    cuda_model = copy.deepcopy(model).cuda()
    report = export.export_onnx(cuda_model, spec, tmp_path / "model.onnx")
    assert report.parity.max_rel_error <= 1e-5
    assert all(p.device.type == "cuda" for p in cuda_model.parameters())
    x = _x(spec, 2)
    out = _session(tmp_path / "model.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert rel_err(model(x), torch.from_numpy(out)) <= 1e-5
