"""The command-line end shared by the side-by-side comparisons (compare_reference, compare_kserve, compare_ray).

Each comparison parses its own options and measures in its own way; what they share is what
happens around the measurement: round and request counts checked, a refusal printed as one line
with exit 2, the table printed, and the figures written as JSON where `--out` asks for them.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

COUNTS = ("rounds", "sequential", "concurrent", "concurrency")


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
