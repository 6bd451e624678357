"""`bnfold bench` on the user's own models, and figures it refuses to present as results."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from bnfold.bench.report import summary_lines
from bnfold.bench.run import BenchResult, Speedup, flag_untrustworthy
from bnfold.bench.timing import BenchRow
from bnfold.cli import main

NET = textwrap.dedent("""
    from torch import nn

    class Net(nn.Module):
        def __init__(self, classes=3):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

        def forward(self, x):
            return self.body(x)
""")


def test_state_dict_with_model_class_benches_eager_folded_and_ort(tmp_path, capsys, randomize_bn):
    file = tmp_path / "benchnet.py"
    file.write_text(NET)
    from bnfold.models.loader import import_class

    torch.save(randomize_bn(import_class(f"{file}:Net")(classes=3)).state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "bench"
    code = main(["bench", str(tmp_path / "sd.pt"), "--model-class", f"{file}:Net", "--input-shape", "1,3,16,16",
                 "--devices", "cpu", "--backends", "eager,folded,ort", "--batch-sizes", "1", "--seconds", "0.05",
                 "--min-iterations", "20", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "model: a state_dict loaded into" in captured.out  # what the file turned out to be
    report = json.loads((out / "report.json").read_text())
    rows = {r["backend"]: r for r in report["results"]}
    assert {"eager", "folded", "ort"} <= set(rows)
    assert all(rows[b]["status"] == "ok" and rows[b]["iterations"] >= 20 for b in ("eager", "folded", "ort"))
    from bnfold.options import available_cpus

    assert report["environment"]["threads"] == available_cpus()  # --threads 0, every command's default
    assert report["environment"]["input_shape"] == [3, 16, 16]


def test_an_onnx_file_benches_without_a_checkpoint(tmp_path, tiny_onnx, capsys):
    """It used to fail in torch.load with weights_only advice and raw ANSI codes."""
    code = main(["bench", str(tiny_onnx), "--devices", "cpu", "--backends", "eager,ort", "--batch-sizes", "1,2",
                 "--seconds", "0.05", "--min-iterations", "10", "--out", str(tmp_path / "bench")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "\x1b[" not in captured.out and "weights_only" not in captured.out + captured.err
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    rows = {(r["backend"], r["batch_size"]): r for r in report["results"]}
    assert rows[("ort", 1)]["status"] == "ok" and rows[("ort", 2)]["iterations"] >= 10
    assert rows[("eager", 1)]["status"] == "skipped" and "ONNX file" in rows[("eager", 1)]["reason"]
    assert report["environment"]["input_shape"] == [1, 28, 28]


def test_a_torchscript_file_runs_eager_and_torchscript_and_skips_the_rest_saying_why(tmp_path, capsys):
    """The folded, export and HTTP rows were "failed" with a nested RuntimeError/BnfoldError each."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 8, 8)), str(tmp_path / "net.ts"))
    code = main(["bench", str(tmp_path / "net.ts"), "--input-shape", "1,3,8,8", "--devices", "cpu",
                 "--backends", "eager,folded,torchscript,program,ort,http", "--batch-sizes", "1",
                 "--seconds", "0.05", "--min-iterations", "10", "--out", str(tmp_path / "bench")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {r["backend"]: r for r in json.loads((tmp_path / "bench" / "report.json").read_text())["results"]}
    assert rows["eager"]["status"] == rows["torchscript"]["status"] == "ok"
    for name in ("folded", "program", "ort", "http", "http-8conn"):
        assert rows[name]["status"] == "skipped", rows[name]
        assert rows[name]["reason"].startswith("the model is a TorchScript module: bnfold cannot fold or export")


def test_noisy_rows_and_busy_machines_are_flagged_not_reported_as_results():
    rows = [BenchRow("eager", "cpu", 1, p50_ms=1.0, p90_ms=1.2, iterations=200),
            BenchRow("folded", "cpu", 1, p50_ms=1.0, p90_ms=100.0, iterations=200),
            BenchRow("ort", "cpu", 1, p50_ms=0.5, p90_ms=0.6, iterations=7)]
    env = {"load_average": [9.5, 4.0, 2.0], "cpus_available": 2}
    warning = flag_untrustworthy(rows, env, min_iterations=30)
    assert rows[0].warning == ""
    assert "p90 is 100.0x p50" in rows[1].warning and "only 7 calls" in rows[2].warning
    assert "load average 9.5 over 2" in warning
    env["warning"] = warning
    result = BenchResult(rows, env, [Speedup("folded vs unfolded eager (cpu)", "eager@cpu", "folded@cpu", 1, 1.0)])
    text = "\n".join(summary_lines(result))
    assert "(from a noisy row: not a result)" in text and "load average 9.5" in text
    assert flag_untrustworthy(rows[:1], {"load_average": [0.5, 0.5, 0.5], "cpus_available": 2}, 30) == ""


@pytest.mark.dynamo   # the dynamo exporter's failure on a fixed batch is what the hint answers
def test_a_fixed_batch_program_is_told_to_export_with_static_batch_and_reuse_the_folder(tmp_path, capsys):
    """The exporter's hint said "try --static-batch", an option bench does not have."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), str(tmp_path / "net.pt2"))
    common = ["--devices", "cpu", "--backends", "eager,ort", "--batch-sizes", "1", "--seconds", "0.05",
              "--min-iterations", "10"]
    assert main(["bench", str(tmp_path / "net.pt2"), *common, "--out", str(tmp_path / "b1")]) == 0
    rows = {r["backend"]: r for r in json.loads((tmp_path / "b1" / "report.json").read_text())["results"]}
    assert rows["ort"]["status"] == "failed"
    assert "--format onnx --static-batch --out DIR` and bench with --export-dir DIR" in rows["ort"]["reason"]
    # Doing what it says works.
    assert main(["export", str(tmp_path / "net.pt2"), "--static-batch", "--format", "onnx",
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 0
    assert main(["bench", str(tmp_path / "net.pt2"), *common, "--export-dir", str(tmp_path / "x"),
                 "--out", str(tmp_path / "b2")]) == 0
    capsys.readouterr()
    rows = {r["backend"]: r for r in json.loads((tmp_path / "b2" / "report.json").read_text())["results"]}
    assert rows["ort"]["status"] == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_only_cuda_asked_for_on_a_machine_without_it_is_refused(tmp_path, capsys):
    """It used to write a report whose every row was skipped, and exit 0."""
    assert main(["bench", "no-such-model.pt", "--devices", "cuda", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--devices cuda asked for, but CUDA is not available" in err and "--devices cpu,cuda" in err
    assert not (tmp_path / "b").exists()
