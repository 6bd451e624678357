"""Timing: one row of figures, the latency summary every benchmark uses, and the interleaved loop.

No torch here: the HTTP load generator and the reference comparison use `latency_stats` too.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

OK, SKIPPED, FAILED = "ok", "skipped", "failed"


@dataclass
class BenchRow:
    """One backend on one device at one batch size. Times are per call (one batch), in ms."""

    backend: str
    device: str
    batch_size: int
    status: str = OK
    reason: str = ""
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    iterations: int = 0
    items_per_s: float | None = None
    note: str = ""
    warning: str = ""          # why this row's figures should not be trusted (noisy, too few calls)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_stats(ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50, p90, p99, mean and min of latencies in milliseconds (NaN for no samples)."""
    ms = np.asarray(ms, dtype=np.float64)
    if ms.size == 0:
        nan = float("nan")
        return {"p50_ms": nan, "p90_ms": nan, "p99_ms": nan, "mean_ms": nan, "min_ms": nan}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


@dataclass
class TimedCall:
    """A ready-to-call backend: `fn()` runs one batch and returns only when the result is done.

    `measure_interleaved` appends each call's time to `samples_ns` and fills `row`'s figures.
    """

    row: BenchRow
    fn: Callable[[], Any]
    samples_ns: list[int] = field(default_factory=list)
    measured_ns: int = 0


def warm_up(timed: TimedCall, seconds: float, min_calls: int = 3) -> None:
    """Call `timed.fn` for `seconds` (and at least `min_calls` times) before it is measured."""
    deadline = time.perf_counter() + seconds
    calls = 0
    while calls < min_calls or time.perf_counter() < deadline:
        timed.fn()
        calls += 1


def measure_interleaved(calls: Sequence[TimedCall], seconds: float, *, burst_s: float | None = None,
                        min_iterations: int = 5, progress: Any = None) -> None:
    """Time every call in rounds of short bursts (A B C A B C ...) until each has `seconds` of calls.

    Each call is timed alone with `perf_counter_ns`; a burst is at least one call, so a slow
    backend still advances. The garbage collector is paused so that a collection triggered by
    one backend is not billed to another.
    """
    burst_ns = int((burst_s if burst_s is not None else min(0.05, max(seconds / 20, 0.002))) * 1e9)
    budget_ns = int(seconds * 1e9)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        pending = list(calls)
        while pending:
            for timed in pending:
                fn, samples = timed.fn, timed.samples_ns
                burst_end = time.perf_counter_ns() + burst_ns
                while True:
                    t0 = time.perf_counter_ns()
                    fn()
                    t1 = time.perf_counter_ns()
                    samples.append(t1 - t0)
                    timed.measured_ns += t1 - t0
                    if t1 >= burst_end:
                        break
            if progress is not None:  # set, not added: float increments would overshoot the total
                progress.n = sum(min(c.measured_ns, budget_ns) for c in calls) / 1e9
                progress.refresh()
            pending = [c for c in pending if c.measured_ns < budget_ns or len(c.samples_ns) < min_iterations]
    finally:
        if gc_was_enabled:
            gc.enable()
    for timed in calls:
        stats = latency_stats(np.asarray(timed.samples_ns, dtype=np.float64) / 1e6)
        row = timed.row
        row.p50_ms, row.p90_ms, row.p99_ms = stats["p50_ms"], stats["p90_ms"], stats["p99_ms"]
        row.mean_ms, row.min_ms = stats["mean_ms"], stats["min_ms"]
        row.iterations = len(timed.samples_ns)
        row.items_per_s = row.batch_size / (row.mean_ms / 1e3)


__all__ = ["OK", "SKIPPED", "FAILED", "BenchRow", "TimedCall", "latency_stats", "measure_interleaved", "warm_up"]
