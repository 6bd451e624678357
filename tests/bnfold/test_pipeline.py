"""`bnfold pipeline` end to end on the bundled digits, with a tiny budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bnfold import models
from bnfold.cli import main


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny pipeline run (1 epoch, 0.05 s per bench row) shared by the checks below."""
    out = tmp_path_factory.mktemp("pipeline") / "demo"
    code = main(["pipeline", "--epochs", "1", "--bench-seconds", "0.05", "--devices", "cpu,cuda",
                 "--out", str(out)])
    assert code == 0
    return out


def test_pipeline_writes_every_stage(pipeline_run: Path) -> None:
    out = pipeline_run
    for name in ("train/best.pt", "export/model.onnx", "export/model.ts", "export/model.pt2",
                 "bench/report.json", "bench/report.md", "bench/latency.png", "bench/throughput.png",
                 "REPORT.md"):
        assert (out / name).is_file(), name
    model, spec = models.load_checkpoint(out / "train" / "best.pt")
    assert spec.arch == "lenet" and spec.epoch == 1


def test_pipeline_report_contents(pipeline_run: Path) -> None:
    out = pipeline_run
    report = (out / "REPORT.md").read_text()
    for section in ("# bnfold pipeline: lenet on digits", "## Training", "## Fold report",
                    "## Parity against the trained PyTorch model", "## Latency at batch size 1",
                    "## Speed-ups at batch size 1"):
        assert section in report, section
    # The parity table has the folded module and the exported files, each with figures.
    parity = report.split("## Parity against the trained PyTorch model")[1].split("\n## ")[0]
    assert "folded module" in parity and "model.onnx" in parity
    # Charts are linked relative to REPORT.md and exist there.
    for link in ("bench/latency.png", "bench/throughput.png"):
        assert f"]({link})" in report and (out / link).is_file()
    # The headline is the held-out accuracy the checkpoint recorded, not the training one.
    _, spec = models.load_checkpoint(out / "train" / "best.pt")
    metric = spec.metrics["test_accuracy"]
    assert 0.0 <= metric <= 1.0
    assert f"test_accuracy = {metric:.4f}" in report
    # --threads 0 (every command's default): one count, the CPUs this process may use, for every
    # backend, and the report says which.
    from bnfold.options import available_cpus

    assert f"| threads (torch and onnxruntime) | {available_cpus()} |" in report
    assert "--threads 0" in report   # the command line quoted at the top


def test_pipeline_bench_rows(pipeline_run: Path) -> None:
    out = pipeline_run
    rows = json.loads((out / "bench" / "report.json").read_text())["results"]
    ok = {(r["backend"], r["device"]) for r in rows if r["status"] == "ok" and r["batch_size"] == 1}
    assert {("eager", "cpu"), ("folded", "cpu"), ("ort", "cpu"), ("http", "cpu")} <= ok
    if not torch.cuda.is_available():
        assert all(r["status"] == "skipped" for r in rows if r["device"] == "cuda")


def test_pipeline_refuses_a_used_folder_without_force(pipeline_run: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = pipeline_run
    before = (out / "REPORT.md").stat().st_mtime_ns
    code = main(["pipeline", "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and str(out) in err and "Traceback" not in err
    assert (out / "REPORT.md").stat().st_mtime_ns == before


def test_pipeline_int8_stage_and_artifact_table(pipeline_run: Path) -> None:
    out = pipeline_run
    assert (out / "export" / "model.int8.onnx").is_file()
    record = json.loads((out / "export" / "export.json").read_text())
    gate = next(a for a in record["artifacts"] if a["format"] == "int8")["int8"]["accuracy"]
    assert gate["passed"] and gate["eval_samples"] == 360
    report = (out / "REPORT.md").read_text()
    table = report.split("## Artifacts: accuracy, size, latency")[1].split("\n## ")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| artifact | weights | accuracy | size | p50 batch 1, CPU | speed-up vs eager |")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[1:]}
    assert set(rows) == {"checkpoint (eager PyTorch)", "model.onnx", "model.ts", "model.pt2", "model.int8.onnx"}
    # The INT8 row carries the gate's own figure and a measured latency (ort-int8 bench row).
    assert f"| int8 | {gate['int8']:.4f} |" in rows["model.int8.onnx"]
    assert rows["model.int8.onnx"].rstrip(" |").endswith("x") and " ms |" in rows["model.int8.onnx"]
    bench = json.loads((out / "bench" / "report.json").read_text())["results"]
    assert any(r["backend"] == "ort-int8" and r["device"] == "cpu" and r["status"] == "ok" for r in bench)
