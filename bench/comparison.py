"""What the side-by-side comparisons (compare_reference, compare_kserve, compare_ray) share.

Each comparison parses its own options and measures in its own way; what they share is what
happens around the measurement: round and request counts checked, a refusal printed as one line
with exit 2, the table printed, and the figures written as JSON where `--out` asks for them; and
how one target's load tests pool over the rounds (`pool`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.bench.loadtest import LoadtestResult
from bnfold.bench.timing import latency_stats

COUNTS = ("rounds", "sequential", "concurrent", "concurrency")


@dataclass
class Figures:
    """One target over all rounds: latency percentiles of the sequential requests pooled together,
    throughput as all concurrent requests over all their seconds, and every error."""

    name: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    sequential_requests: int
    rps: float
    concurrent_requests: int
    errors: int


def pool(name: str, sequential: list[LoadtestResult], concurrent: list[LoadtestResult]) -> Figures:
    """The `Figures` of one target from its per-round sequential and concurrent load tests."""
    ms = np.concatenate([r.latencies_ms for r in sequential])
    stats = latency_stats(ms)
    total = sum(r.requests for r in concurrent)
    return Figures(name, stats["p50_ms"], stats["p90_ms"], stats["p99_ms"], int(ms.size),
                   total / sum(r.seconds for r in concurrent), total, sum(r.errors for r in sequential + concurrent))


def run_comparison(prog: str, args: argparse.Namespace, measure: Callable[[], dict[str, Any]],
                   format_report: Callable[[dict[str, Any]], str],
                   errors: tuple[type[BaseException], ...]) -> int:
    """Check `args`' counts, run `measure()`, print its report (and write `args.out`); the exit status."""
    for option in COUNTS:
        value = getattr(args, option)
        if value < 1:
            print(f"{prog}: error: --{option} must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        report = measure()
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0
