"""bench's latency chart and tables read right: a linear axis from 0 with the figures written on the bars,
every measured row drawn (the 8-connection HTTP one too), backends under the names people know."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from bnfold.bench.backends import BACKENDS, backend_label
from bnfold.bench.report import latency_figure, latency_table, write_report
from bnfold.bench.run import BenchResult
from bnfold.bench.timing import SKIPPED, BenchRow
from bnfold.models.plotting import pyplot

ENV = {"model": "lenet", "input_shape": [1, 28, 28], "dtype": "float32", "cpu": "test CPU", "threads": 1}


def _result() -> BenchResult:
    rows = [BenchRow("eager", "cpu", 1, p50_ms=0.27, p90_ms=0.30, iterations=500),
            BenchRow("program", "cpu", 1, p50_ms=0.20, p90_ms=0.22, iterations=500),
            BenchRow("ort", "cpu", 1, p50_ms=0.03, p90_ms=0.035, iterations=5000),
            BenchRow("ort-int8", "cpu", 1, p50_ms=0.54, p90_ms=0.6, iterations=500),
            BenchRow("http", "cpu", 1, p50_ms=0.40, p90_ms=0.5, iterations=800),
            BenchRow("http-8conn", "cpu", 1, p50_ms=1.1, p90_ms=1.6, iterations=1600, items_per_s=7100.0),
            BenchRow("torchscript", "cpu", 1, status=SKIPPED, reason="not exported")]
    return BenchResult(rows, dict(ENV))


def test_every_backend_has_the_name_people_know() -> None:
    assert backend_label("program") == "torch.export" and backend_label("torchscript") == "TorchScript"
    assert backend_label("ort-int8") == "onnxruntime INT8" and backend_label("something-new") == "something-new"
    assert all(b.label for b in BACKENDS.values())


def test_latency_bars_are_linear_from_zero_with_figures_and_ratios_written() -> None:
    fig = latency_figure(_result())
    ax = fig.axes[0]
    try:
        assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0
        ticks = [t.get_text() for t in ax.get_yticklabels()]
        assert ticks == ["PyTorch eager", "torch.export", "onnxruntime", "onnxruntime INT8", "HTTP, 1 connection",
                         "HTTP, 8 connections"]
        texts = [t.get_text() for t in ax.texts]
        assert "0.270 ms" in texts
        assert "0.030 ms, 9.00x faster than eager" in texts
        assert "0.540 ms, 2.00x slower than eager" in texts
        assert "1.100 ms, p50 under load, 7,100 requests/s" in texts   # the 8-connection row is drawn
        assert ax.get_title().endswith(", 1 thread")
        assert any("not measured" in t.get_text() and "TorchScript on cpu" in t.get_text() for t in fig.texts)
    finally:
        pyplot().close(fig)


def test_report_tables_name_backends_and_their_keys(tmp_path: Path) -> None:
    result = _result()
    table = latency_table(result)
    assert "| torch.export (`program`) | cpu | 0.200 |" in table and "| HTTP, 8 connections (`http-8conn`) |" in table
    files = write_report(result, tmp_path)
    chart = files.charts[0]
    assert chart.name == "latency.png" and Image.open(chart).size[0] >= 900
    assert "1 threads" not in files.markdown.read_text()
