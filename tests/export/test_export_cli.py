"""`bnfold export` end to end on a saved LeNet-BN checkpoint, with the bundled digits as parity data."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from google.protobuf import text_format

from bnfold import export
from bnfold.cli import main


def _no_staging_left(folder: Path) -> None:
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert hidden == [], hidden


def test_bnfold_export_writes_verified_files_export_json_and_a_triton_model(
        lenet, untrained_lenet_checkpoint, tmp_path, capfd, model_config_pb2) -> None:
    model, spec = lenet
    out, repo = tmp_path / "export", tmp_path / "repo"
    code = main(["export", str(untrained_lenet_checkpoint), "--out", str(out), "--triton-repo", str(repo),
                 "--no-progress"])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr
    # The exporters' own chatter stays off the terminal; the parity table is printed.
    assert "[torch.onnx]" not in stdout + stderr and "deprecated" not in stdout + stderr
    for name in ("model.onnx", "model.ts", "model.pt2", "max rel err", "top-1 agree"):
        assert name in stdout
    assert "eval-split samples of 'digits'" in stdout

    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "model.pt2", "model.ts"]
    report = json.loads((out / "export.json").read_text())
    assert report["format"] == "bnfold-export"
    assert report["spec"] == spec.to_dict()
    assert [a["format"] for a in report["artifacts"]] == ["onnx", "torchscript", "program"]
    for artifact in report["artifacts"]:
        path = Path(artifact["path"])
        assert path.parent == out and path.stat().st_size == artifact["size_bytes"]
        assert artifact["max_rel_error"] <= 1e-5 == artifact["tolerance"]["max_rel_error"]
        assert artifact["max_abs_error"] >= 0 and artifact["top1_agreement"] == 1.0
        assert artifact["samples"] == export.artifacts.PARITY_SAMPLES
        assert "digits" in artifact["parity_inputs"]
    assert len(report["fold_report"]["folded"]) == 4  # LeNet-BN: two Conv+BN, two Linear+BN

    config = text_format.Parse((repo / "lenet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert list(config.input[0].dims) == [1, 28, 28] and list(config.output[0].dims) == [10]
    assert (repo / "lenet" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    _no_staging_left(tmp_path)
    _no_staging_left(repo)

    # A second run needs --force; with it, the folder is replaced as a whole.
    assert main(["export", str(untrained_lenet_checkpoint), "--out", str(out), "--no-progress"]) == 2
    assert "--force" in capfd.readouterr().err
    code = main(["export", str(untrained_lenet_checkpoint), "--out", str(out), "--format", "onnx",
                 "--static-batch", "--triton-repo", str(repo), "--triton-device", "cuda",
                 "--force", "--no-progress"])
    capfd.readouterr()
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    dim0 = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 1
    config = text_format.Parse((repo / "lenet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    # A fixed batch axis: Triton wants max_batch_size 0 and the full shape.
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 1, 28, 28]
    assert not config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    _no_staging_left(tmp_path)


def test_export_model_returns_a_summary_matching_the_files(untrained_lenet_checkpoint, tmp_path) -> None:
    summary = export.export_model(export.ExportConfig(untrained_lenet_checkpoint, tmp_path / "out",
                                                           formats="torchscript,program", progress=False))
    assert [a.format for a in summary.artifacts] == ["torchscript", "program"]
    assert summary.export_json == tmp_path / "out" / "export.json" and summary.export_json.is_file()
    assert summary.artifact("program").path == tmp_path / "out" / "model.pt2"
    loaded = torch.export.load(str(summary.artifact("program").path)).module()
    assert loaded(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    text = str(summary)
    assert "model.ts" in text and "model.pt2" in text and "folded" in text.lower()


def test_a_new_format_is_one_entry_in_the_writers_table(untrained_lenet_checkpoint, tmp_path, monkeypatch) -> None:
    # A format written by the TorchScript writer under another file name: export_model, the
    # format check and the file-name lookup all follow the table, with no other edit.
    monkeypatch.setitem(export.WRITERS, "ts-copy", export.Writer(
        "model.copy.ts", export.WRITERS["torchscript"].write, export.load_torchscript, "torchscript", "a test format"))
    summary = export.export_model(export.ExportConfig(untrained_lenet_checkpoint, tmp_path / "out",
                                                           formats="ts-copy", progress=False))
    assert [a.format for a in summary.artifacts] == ["torchscript"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export.json", "model.copy.ts"]
    loaded = export.WRITERS["ts-copy"].read(tmp_path / "out" / "model.copy.ts")
    assert loaded(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_the_served_config_and_config_pbtxt_are_the_same_document(tiny_onnx, model_config_pb2) -> None:
    """One ModelConfig builder: `GET /v2/models/{m}/config` and the config.pbtxt export writes agree."""
    from google.protobuf import json_format

    from bnfold.export.triton import triton_config
    from bnfold.serve.app import InferenceApp
    from bnfold.serve.runtime import open_session

    runtime = open_session(tiny_onnx, threads=1)
    served = InferenceApp._config(runtime)
    written = json_format.MessageToDict(
        text_format.Parse(triton_config(onnx.load(str(tiny_onnx)), runtime.name), model_config_pb2.ModelConfig()),
        preserving_proto_field_name=True)
    for key in ("name", "platform", "max_batch_size"):
        assert served[key] == written[key], key
    for key in ("input", "output"):
        assert [(t["name"], t["data_type"], t["dims"]) for t in served[key]] == [
            (t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in written[key]], key
    assert served["instance_group"] == written["instance_group"]
    assert served["max_batch_size"] == 32 and served["input"][0]["dims"] == [1, 28, 28]
