"""The ort-int8 and ort-fp16 bench rows: their files exported when missing, measured beside ort FP32."""
from __future__ import annotations

from pathlib import Path

import pytest

from bnfold.bench.run import BenchConfig, run_bench


@pytest.fixture(scope="module")
def trained(trained_lenet_checkpoint: Path) -> Path:
    # Trained a little (the run's shared LeNet): the INT8 export behind the ort-int8 row must pass
    # its accuracy gate. No export beside it: bench writes the INT8 and FP16 files itself.
    return trained_lenet_checkpoint


def test_int8_and_fp16_rows_are_measured_with_their_ratios_to_fp32(trained: Path) -> None:
    result = run_bench(BenchConfig(trained, devices=("cpu", "cuda"), backends=("ort", "ort-int8", "ort-fp16"),
                                   batch_sizes=(1,), threads=1, seconds=0.1, progress=False))
    for backend in ("ort", "ort-int8", "ort-fp16"):
        row = result.row(backend, "cpu", 1)
        assert row is not None and row.ok and row.p50_ms > 0 and row.iterations >= 5, (backend, row)
    # INT8 QDQ is a CPU row: on CUDA it is skipped with the reason, never measured on the CPU.
    cuda = result.row("ort-int8", "cuda", 1)
    assert cuda is not None and cuda.status == "skipped" and "INT8" in cuda.reason
    labels = {s.label: s for s in result.speedups}
    assert {"ort INT8 vs ort FP32 (cpu)", "ort FP16 vs ort FP32 (cpu)"} <= set(labels)
    ratio = labels["ort INT8 vs ort FP32 (cpu)"]
    assert ratio.factor == pytest.approx(result.row("ort", "cpu", 1).p50_ms / result.row("ort-int8", "cpu", 1).p50_ms)
