"""Measuring: in-process batch-1 latency of every backend, the HTTP load generator, the
comparison with the reference service, and the report (JSON, Markdown, charts).

    result = run_bench(BenchConfig("runs/lenet/best.pt", devices=["cpu"]))   # data, no files
    write_report(result, "runs/lenet/bench")                                  # report.json/.md, charts
    run_loadtest("http://127.0.0.1:8000", "lenet", concurrency=8)            # a running server

A new backend is one entry in `bench.backends.BACKENDS`. The public names are imported on first
use, so that `bnfold loadtest` does not pay for importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bnfold.lazy import lazy_attributes

if TYPE_CHECKING:
    from bnfold.bench.backends import BACKENDS, Backend
    from bnfold.bench.loadtest import LoadtestResult, run_loadtest
    from bnfold.bench.report import write_report
    from bnfold.bench.run import BenchConfig, BenchError, BenchResult, run_bench

_LAZY = {"BACKENDS": "bnfold.bench.backends", "Backend": "bnfold.bench.backends",
         "LoadtestResult": "bnfold.bench.loadtest", "run_loadtest": "bnfold.bench.loadtest",
         "write_report": "bnfold.bench.report", "BenchConfig": "bnfold.bench.run", "BenchError": "bnfold.bench.run",
         "BenchResult": "bnfold.bench.run", "run_bench": "bnfold.bench.run"}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


__all__ = sorted(_LAZY)
