"""`bnfold bench` / `bench.run`: interleaved timing, well-formed reports, skipped CUDA rows."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnfold import export
from bnfold import models
from bnfold.cli import main
from bnfold.bench.backends import bound_runner
from bnfold.bench.run import BenchConfig, BenchError, compute_speedups, run_bench
from bnfold.bench.timing import OK, SKIPPED, BenchRow, TimedCall, measure_interleaved

ROW_FIELDS = {"backend", "device", "batch_size", "status", "reason", "p50_ms", "p90_ms", "p99_ms",
              "mean_ms", "iterations", "items_per_s"}
ENV_FIELDS = {"cpu", "gpu", "torch", "onnxruntime", "onnx", "threads", "date", "input_shape", "dtype", "model"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_checkpoint(tmp_path_factory: pytest.TempPathFactory, randomize_bn) -> Path:
    model, spec = models.build_for_dataset("lenet", "digits")
    randomize_bn(model)
    return models.save_checkpoint(tmp_path_factory.mktemp("bench-ckpt") / "lenet.pt", model.eval(), spec)


@pytest.fixture(scope="module")
def bench_exports(bench_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint's ONNX, TorchScript and torch.export files, as `bnfold export` writes them.

    The ONNX file comes from the TorchScript-based exporter: the same verified graph for
    benchmarking purposes, in a second instead of the dynamo exporter's ~15 s on 2 cores.
    """
    out = tmp_path_factory.mktemp("bench-exports")
    model, spec = models.load_checkpoint(bench_checkpoint)
    export.export_onnx(model, spec, out / "model.onnx", legacy_onnx=True)
    export.export_torchscript(model, spec, out / "model.ts")
    export.export_program(model, spec, out / "model.pt2")
    return out


@pytest.fixture(scope="module")
def cli_report(bench_checkpoint: Path, bench_exports: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `bnfold bench` run through the CLI, shared by the report checks below."""
    out = tmp_path_factory.mktemp("bench-report")
    code = main(["bench", str(bench_checkpoint), "--devices", "cpu,cuda", "--batch-sizes", "1,4",
                 "--threads", "1", "--seconds", "0.1", "--export-dir", str(bench_exports), "--out", str(out)])
    assert code == 0
    return out


# ---------------------------------------------------------------------------------------------
# The timing loop, with plain callables


def test_measure_interleaved_alternates_and_fills_rows() -> None:
    order: list[str] = []

    def slow() -> None:
        order.append("slow")
        time.sleep(0.001)

    def fast() -> None:
        order.append("fast")

    calls = [TimedCall(BenchRow("slow", "cpu", 1), slow), TimedCall(BenchRow("fast", "cpu", 4), fast)]
    measure_interleaved(calls, seconds=0.1, burst_s=0.002)
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    # Interleaved: alternating blocks, not one block of each (one switch). About 40 rounds on an
    # idle machine; even if a loaded one stretched every 1 ms sleep to 20 ms there would be 5.
    assert switches >= 4, switches
    slow_row, fast_row = calls[0].row, calls[1].row
    assert slow_row.iterations == order.count("slow") >= 5
    assert fast_row.iterations == order.count("fast") > slow_row.iterations
    assert 0.95 <= slow_row.min_ms <= slow_row.p50_ms <= slow_row.p90_ms <= slow_row.p99_ms
    assert fast_row.p50_ms < slow_row.p50_ms
    assert fast_row.items_per_s == pytest.approx(4 / (fast_row.mean_ms / 1e3))
    # Each call was measured for at least its budget.
    assert all(timed.measured_ns >= 0.1e9 for timed in calls)


def test_speedups_are_ratios_of_p50() -> None:
    rows = [BenchRow("eager", "cpu", 1, p50_ms=2.0), BenchRow("folded", "cpu", 1, p50_ms=1.6),
            BenchRow("ort", "cpu", 1, p50_ms=0.25),
            BenchRow("ort", "cuda", 1, status=SKIPPED, reason="no CUDA")]
    speedups = {s.label: s.factor for s in compute_speedups(rows)}
    assert speedups["folded vs unfolded eager (cpu)"] == pytest.approx(1.25)
    assert speedups["ort vs eager (cpu)"] == pytest.approx(8.0)
    assert not any("GPU" in label for label in speedups)  # the skipped CUDA row has no figure


# ---------------------------------------------------------------------------------------------
# A real run on a tiny LeNet


def test_report_json_is_well_formed(cli_report: Path) -> None:
    report = json.loads((cli_report / "report.json").read_text())
    assert ENV_FIELDS <= set(report["environment"]), set(report["environment"])
    env = report["environment"]
    assert env["threads"] == 1 and env["input_shape"] == [1, 28, 28] and env["model"] == "lenet"
    assert env["torch"] == torch.__version__
    rows = report["results"]
    for row in rows:
        assert ROW_FIELDS <= set(row), row
    measured = {(r["backend"], r["device"], r["batch_size"]) for r in rows if r["status"] == OK}
    for backend in ("eager", "folded", "torchscript", "program", "ort"):
        for batch in (1, 4):
            assert (backend, "cpu", batch) in measured, (backend, batch, rows)
    for row in rows:
        if row["status"] == OK:
            assert row["iterations"] >= 5
            assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
            assert row["items_per_s"] > 0


def test_http_rows_measured_at_batch_one(cli_report: Path) -> None:
    rows = json.loads((cli_report / "report.json").read_text())["results"]
    http = {r["backend"]: r for r in rows if r["backend"] in ("http", "http-8conn", "grpc") and r["device"] == "cpu"}
    assert set(http) == {"http", "http-8conn", "grpc"}   # the gRPC row: the same server's --grpc-port
    for row in http.values():
        assert row["status"] == OK, row
        assert row["batch_size"] == 1 and row["iterations"] >= 50 and row["items_per_s"] > 0
        assert row["p50_ms"] <= row["p99_ms"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_cuda_rows_are_skipped_with_reason(cli_report: Path) -> None:
    rows = json.loads((cli_report / "report.json").read_text())["results"]
    cuda = [r for r in rows if r["device"] == "cuda"]
    backends = {r["backend"] for r in cuda}
    # Every requested backend has a CUDA row, plus the CUDA-only onnxruntime variants.
    assert {"eager", "folded", "torchscript", "program", "ort", "ort-iobinding", "ort-cudagraph",
            "http", "http-8conn", "grpc"} <= backends
    for row in cuda:
        assert row["status"] == SKIPPED and "CUDA" in row["reason"], row
        assert row["p50_ms"] is None
    md = (cli_report / "report.md").read_text()
    assert "skipped" in md and "torch.cuda.is_available() is False" in md


def test_markdown_and_charts(cli_report: Path) -> None:
    md = (cli_report / "report.md").read_text()
    for heading in ("## Environment", "## Latency at batch size 1", "## Speed-ups at batch size 1",
                    "## Throughput against batch size", "## Skipped and failed rows"):
        assert heading in md
    assert "folded vs unfolded eager (cpu)" in md and "ort vs eager (cpu)" in md
    assert "bs=4 items/s" in md
    for chart in ("latency.png", "throughput.png"):
        data = (cli_report / chart).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
        assert f"]({chart})" in md


def test_reuses_export_dir_exports_what_is_missing_and_reports_a_broken_file(
        bench_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "model.ts").write_bytes(b"not a torchscript archive")
    result = run_bench(BenchConfig(bench_checkpoint, devices=("cpu",), backends=("eager", "torchscript", "program"),
                                   batch_sizes=(1,), threads=1, seconds=0.05, progress=False, export_dir=tmp_path))
    assert result.row("eager").status == OK
    # model.pt2 was not there: exported (into a temporary folder, not the export dir) and measured.
    assert result.row("program").status == OK and result.row("program").iterations >= 5
    assert not (tmp_path / "model.pt2").exists()
    broken = result.row("torchscript")
    assert broken.status == "failed" and broken.reason and broken.p50_ms is None


def test_bound_runner_checks_its_output(bench_exports: Path) -> None:
    """The IO-binding path of the CUDA rows, run on CPU buffers (the same onnxruntime API)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(bench_exports / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    expected = session.run(None, {"input": x})[0]
    call = bound_runner(session, x, expected, device="cpu")
    np.testing.assert_allclose(call().numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="differs"):
        bound_runner(session, x, expected + 1.0, device="cpu")


@pytest.mark.parametrize("kwargs, needle", [
    ({"backends": ("eager", "tensorrt")}, "tensorrt"),
    ({"devices": ("tpu",)}, "tpu"),
    ({"seconds": 0.0}, "seconds"),
    ({"batch_sizes": (0,)}, "batch"),
])
def test_rejects_bad_arguments(bench_checkpoint: Path, kwargs: dict, needle: str) -> None:
    args = {"devices": ("cpu",), "backends": ("eager",), "batch_sizes": (1,), "seconds": 0.05} | kwargs
    with pytest.raises(BenchError, match=needle):
        run_bench(BenchConfig(bench_checkpoint, progress=False, **args))


def test_cli_error_exits_2_without_traceback(bench_checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", str(bench_checkpoint), "--backends", "eager,warp", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "'warp'" in err and "Traceback" not in err
    assert not (tmp_path / "report.json").exists()


def test_cli_missing_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pt"
    code = main(["bench", str(missing), "--devices", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compile_row_is_measured_or_explained(bench_checkpoint: Path) -> None:
    result = run_bench(BenchConfig(bench_checkpoint, devices=("cpu",), backends=("eager", "compile"),
                                   batch_sizes=(1,), threads=1, seconds=0.05, progress=False))
    row = result.row("compile")
    assert row is not None
    if row.status == OK:
        assert row.p50_ms > 0 and row.iterations >= 5
    else:
        assert row.status == SKIPPED and row.reason.startswith("torch.compile does not work here")


@pytest.mark.gpu
def test_cuda_rows_measured(bench_checkpoint: Path) -> None:
    import onnxruntime

    result = run_bench(BenchConfig(bench_checkpoint, devices=("cpu", "cuda"), backends=("eager", "folded", "ort"),
                                   batch_sizes=(1,), threads=1, seconds=0.1, progress=False))
    for backend in ("eager", "folded"):
        row = result.row(backend, "cuda")
        assert row.status == OK and row.p50_ms > 0, row
    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    for backend in ("ort", "ort-iobinding", "ort-cudagraph"):
        row = result.row(backend, "cuda")
        if ort_cuda:
            assert row.status == OK and row.p50_ms > 0, row
        else:
            assert row.status == SKIPPED and "onnxruntime-gpu" in row.reason
    labels = {s.label for s in result.speedups}
    assert "GPU vs CPU, eager" in labels
    assert np.isfinite([s.factor for s in result.speedups]).all()


def test_a_new_backend_is_one_entry_in_the_table(bench_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfold.bench.backends import BACKENDS, Backend

    monkeypatch.setitem(BACKENDS, "eager-again", Backend("the eager builder under a second name",
                                                         BACKENDS["eager"].build, versus_eager="again vs eager"))
    result = run_bench(BenchConfig(bench_checkpoint, devices=("cpu",), backends=("eager", "eager-again"),
                                   batch_sizes=(1,), threads=1, seconds=0.05, progress=False))
    row = result.row("eager-again")
    assert row.status == OK and row.iterations >= 5 and row.note == "the eager builder under a second name"
    assert "again vs eager (cpu)" in {s.label for s in result.speedups}
