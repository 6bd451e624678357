"""`bnfold evaluate`: every kind of artifact scored on the whole eval split, in one table."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bnfold import models
from bnfold.cli import main
from bnfold.export.evaluate import evaluate_artifacts, load_eval_split, score


@pytest.fixture(scope="module")
def trained(trained_lenet_checkpoint: Path) -> Path:
    """The run's trained LeNet (tests/conftest.py: 40 steps on the digits), shared with other files."""
    return trained_lenet_checkpoint


@pytest.fixture(scope="module")
def exported(lenet_exports: Path) -> Path:
    """`bnfold export` of it in every format (onnx, torchscript, program, fp16, int8), shared."""
    return lenet_exports


def test_evaluate_agrees_with_the_training_logs_test_accuracy(trained: Path, capfd: pytest.CaptureFixture) -> None:
    code = main(["evaluate", str(trained), "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    row = json.loads(out)["results"][0]
    logged = [json.loads(line) for line in (trained.parent / "metrics.jsonl").read_text().splitlines()]
    assert row["kind"] == "checkpoint" and row["metric"] == "accuracy" and row["samples"] == 360
    # best.pt is the epoch with the best test accuracy; the figure is recomputed, not copied.
    assert row["value"] == pytest.approx(max(r["test_accuracy"] for r in logged), abs=1e-12)
    assert row["logged"] == pytest.approx(row["value"], abs=1e-12)


def test_every_artifact_kind_in_one_table(trained: Path, exported: Path, capfd: pytest.CaptureFixture) -> None:
    files = [trained, exported / "model.onnx", exported / "model.ts", exported / "model.pt2",
             exported / "model.fp16.onnx", exported / "model.int8.onnx"]
    code = main(["evaluate", *map(str, files)])
    out, err = capfd.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 + len(files)  # header, rule, one row each
    for name, kind in [("best.pt", "checkpoint"), ("model.onnx", "onnx"), ("model.ts", "torchscript"),
                       ("model.pt2", "program"), ("model.fp16.onnx", "onnx"), ("model.int8.onnx", "onnx")]:
        assert any(name in line and kind in line for line in lines[2:]), (name, out)

    report = evaluate_artifacts(files)
    by_name = {row.artifact.name: row for row in report.rows}
    assert by_name["model.int8.onnx"].dtype == "int8" and by_name["model.onnx"].dtype == "float32"
    assert by_name["model.fp16.onnx"].dtype == "float16"
    assert by_name["model.onnx"].spec_source == "ONNX metadata"
    assert by_name["model.ts"].spec_source == "export.json beside it"
    reference = by_name["best.pt"].value
    for name in ("model.onnx", "model.ts", "model.pt2", "model.fp16.onnx"):
        # Folded FP32 (and FP16): at most one of the 360 digits may flip on a rounding-level difference.
        assert abs(by_name[name].value - reference) <= 1 / 360 + 1e-12, name
    record = json.loads((exported / "export.json").read_text())
    int8 = next(a for a in record["artifacts"] if a["format"] == "int8")["int8"]["accuracy"]
    assert by_name["model.int8.onnx"].value == pytest.approx(int8["int8"], abs=1e-12)
    assert by_name["model.onnx"].value == pytest.approx(int8["fp32"], abs=1e-12)


def test_a_file_without_a_spec_needs_the_checkpoint(trained: Path, exported: Path, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture) -> None:
    alone = tmp_path / "model.ts"
    shutil.copy(exported / "model.ts", alone)   # no export.json beside it
    assert main(["evaluate", str(alone)]) == 2
    err = capfd.readouterr().err
    assert "--checkpoint" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", str(alone), "--checkpoint", str(trained), "--json"]) == 0
    row = json.loads(capfd.readouterr().out)["results"][0]
    assert row["spec_source"] == "--checkpoint" and row["kind"] == "torchscript"


def test_missing_and_foreign_files_are_one_line_errors(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    for target in (tmp_path / "missing.onnx", junk):
        assert main(["evaluate", str(target)]) == 2
        err = capfd.readouterr().err
        assert err.startswith("bnfold evaluate: error:") and "Traceback" not in err
        assert str(target) in err


def test_score_is_the_training_loops_metric() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]], dtype=np.float32)
    assert score("classification", logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    # IoU is summed over the whole split, not averaged per image: 2 shared of 4 in the union.
    masks = np.array([[[[1, 1], [0, 0]]], [[[0, 0], [0, 1]]]], dtype=np.float32)
    outputs = np.where(np.array([[[[1, 0], [0, 0]]], [[[0, 0], [1, 1]]]]) > 0, 5.0, -5.0)
    assert score("segmentation", outputs, masks) == pytest.approx(2 / 4)


def test_unet_iou_matches_its_training_log(tmp_path: Path) -> None:
    result = models.train(models.TrainConfig(model="unet", dataset="digits", epochs=1, steps_per_epoch=5,
                                             out=str(tmp_path / "unet"), device="cpu", progress=False, threads=1))
    row = evaluate_artifacts([result.best]).rows[0]
    assert row.metric == "iou" and row.samples == len(load_eval_split(result.spec).inputs)
    assert row.value == pytest.approx(result.history[-1]["test_iou"], abs=1e-12)


def test_a_folded_module_is_scored_with_its_checkpoints_spec(trained: Path, tmp_path: Path,
                                                             capfd: pytest.CaptureFixture) -> None:
    folded = tmp_path / "folded.pt"
    assert main(["fold", str(trained), "--out", str(folded)]) == 0
    capfd.readouterr()
    # A whole pickled module runs code when loaded: only with --trust-pickle, and it says so.
    assert main(["evaluate", str(folded), "--checkpoint", str(trained)]) == 2
    assert "--trust-pickle" in capfd.readouterr().err
    report = evaluate_artifacts([trained, folded], checkpoint=trained, trust_pickle=True)
    checkpoint_row, folded_row = report.rows
    assert folded_row.kind == "module" and folded_row.spec_source == "--checkpoint"
    assert abs(folded_row.value - checkpoint_row.value) <= 1 / 360 + 1e-12


def test_a_state_dict_with_model_class_and_a_timm_name_are_evaluated(trained: Path, tmp_path: Path,
                                                                     capfd: pytest.CaptureFixture) -> None:
    """The loader asks a state_dict for --model-class, which evaluate lacked; timm:NAME (no file) crashed
    with a traceback on the table's file size."""
    import torch

    model, spec = models.load_checkpoint(trained)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert main(["evaluate", str(tmp_path / "weights.pt")]) == 2
    assert "pass --model-class" in capfd.readouterr().err
    code = main(["evaluate", str(tmp_path / "weights.pt"), "--model-class", "bnfold.models.lenet:LeNet",
                 "--model-args", json.dumps(spec.arch_kwargs), "--checkpoint", str(trained), "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    row = json.loads(out)["results"][0]
    assert row["value"] == pytest.approx(evaluate_artifacts([trained]).rows[0].value, abs=1e-12)
    assert row["size_bytes"] == (tmp_path / "weights.pt").stat().st_size

    code = main(["evaluate", "timm:resnet18", "--model-args", '{"in_chans": 1, "num_classes": 10}',
                 "--checkpoint", str(trained), "--json"])
    out, err = capfd.readouterr()
    assert code == 0 and "Traceback" not in err, err
    row = json.loads(out)["results"][0]
    assert row["samples"] == 360 and 0.0 <= row["value"] <= 1.0 and row["size_bytes"] == 0


def test_a_model_whose_spec_names_no_dataset_is_asked_for_eval_data(make_tiny_onnx, tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture) -> None:
    # What `bnfold export theirs.onnx --labels ...` writes: a spec without a bnfold dataset. evaluate
    # once answered "the eval split of '' is not available: unknown dataset ''".
    from bnfold.models.spec import ModelSpec, Preprocess

    spec = ModelSpec(arch="theirs", arch_kwargs={}, task="classification", input_shape=[1, 28, 28],
                     preprocess=Preprocess(mode="L", resize=28, crop=[28, 28], mean=[0.5], std=[0.25]),
                     labels=[str(i) for i in range(10)], dataset="")
    onnx_file = make_tiny_onnx(tmp_path / "model.onnx", spec=spec)
    assert main(["evaluate", str(onnx_file)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "names no dataset" in err and "--eval-data PATH" in err, err
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32))
    assert main(["evaluate", str(onnx_file), "--eval-data", str(tmp_path / "x.npy")]) == 0, capfd.readouterr().err
