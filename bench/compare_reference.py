"""bnfold's server beside the plain FastAPI + pydantic service, in one run, with one load generator.

    python -m bnfold.bench.compare_reference --onnx runs/lenet/export/model.onnx

Both servers run on loopback, single worker, one onnxruntime intra-op thread (the reference
hard-codes 1). Rounds alternate between the targets (bnfold binary, bnfold JSON, reference
JSON), each round measuring sequential latency (one connection) and throughput (8 connections)
with `bench.loadtest`; latencies are pooled over rounds and throughput is total requests over
total time. The reference is `bench.reference_service` (FastAPI + a pydantic JSON body, shipped
in the package, needing the `compare` extra) under uvicorn's defaults; bnfold runs as `bnfold
serve` with its default JSON-lines access log on.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bnfold.serve.launch import free_port, running_server, server_process
from bnfold.bench.loadtest import LoadtestResult, run_loadtest
from bnfold.bench.comparison import Figures, pool, run_comparison
from bnfold.serve.runtime import ServeError, open_session

# The reference service, as uvicorn imports it: a factory in this package (so it runs from a wheel).
REFERENCE_APP = "bnfold.bench.reference_service:create_app"


def check_reference_dependencies() -> None:
    """The reference service needs FastAPI (and its pydantic): a `ServeError` in one line when missing."""
    missing = []
    for name in ("fastapi", "pydantic"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServeError(f"the reference service needs {' and '.join(missing)}, which "
                         f"{'is' if len(missing) == 1 else 'are'} not installed: "
                         f"pip install 'bnfold[compare]'", status=500)


@contextlib.contextmanager
def reference_server(onnx_path: str | os.PathLike, port: int | None = None, startup_timeout: float = 120.0,
                     on_ready: Callable[[subprocess.Popen], None] | None = None) -> Iterator[str]:
    """The reference FastAPI service (`bench.reference_service`) under uvicorn, yielding its base URL."""
    from .reference_service import MODEL_ENV

    check_reference_dependencies()
    port = free_port() if port is None else port
    command = [sys.executable, "-m", "uvicorn", "--factory", REFERENCE_APP, "--host", "127.0.0.1", "--port", str(port)]
    with server_process(command, port, ready_path="/openapi.json", startup_timeout=startup_timeout,
                        env={MODEL_ENV: str(Path(onnx_path).resolve())}, on_ready=on_ready) as url:
        yield url


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class TargetFigures(Figures):
    server_cpu_us_per_request: float   # server process CPU time / requests, over the x8 runs
    generator_cpu_us_per_request: float  # the load generator's, likewise


def _pool(name: str, sequential: list[LoadtestResult], concurrent: list[LoadtestResult],
          cpu: float) -> TargetFigures:
    figures = pool(name, sequential, concurrent)
    total = figures.concurrent_requests
    return TargetFigures(**asdict(figures), server_cpu_us_per_request=cpu / total * 1e6,
                         generator_cpu_us_per_request=sum(r.client_cpu_us * r.requests for r in concurrent) / total)


def compare(onnx_path: str | os.PathLike, *, rounds: int = 3, sequential: int = 1000, concurrent: int = 4000,
            concurrency: int = 8, threads: int = 1) -> dict:
    """Measure both services interleaved; returns the pooled figures and the ratios."""
    check_reference_dependencies()   # before anything starts
    runtime = open_session(onnx_path, threads=1, warmup=False)
    name = runtime.name
    x = np.random.default_rng(0).standard_normal(runtime.sample_input(1).shape).astype(np.float32)
    pids: dict[str, int] = {}
    with running_server(onnx_path, threads=threads, on_ready=lambda p: pids.__setitem__("bnfold", p.pid)) as ours, \
            reference_server(onnx_path, on_ready=lambda p: pids.__setitem__("reference", p.pid)) as ref:
        targets = {
            "bnfold binary": lambda c, n: run_loadtest(ours, name, concurrency=c, requests=n, binary=True, inputs=x),
            "bnfold json": lambda c, n: run_loadtest(ours, name, concurrency=c, requests=n, binary=False, inputs=x),
            "reference json": lambda c, n: run_loadtest(ref, None, concurrency=c, requests=n, reference=True, inputs=x),
        }
        seq: dict[str, list[LoadtestResult]] = {k: [] for k in targets}
        conc: dict[str, list[LoadtestResult]] = {k: [] for k in targets}
        cpu: dict[str, float] = {k: 0.0 for k in targets}
        per_round = []
        for r in range(rounds):
            row = {}
            for key, drive in targets.items():
                seq[key].append(drive(1, sequential))
                pid = pids["reference" if key.startswith("reference") else "bnfold"]
                before = cpu_seconds(pid)
                conc[key].append(drive(concurrency, concurrent))
                cpu[key] += cpu_seconds(pid) - before
                row[key] = {"p50_ms": seq[key][-1].p50_ms, "rps": conc[key][-1].rps}
                print(f"round {r + 1}/{rounds} {key:15s} p50 {seq[key][-1].p50_ms:.3f} ms  "
                      f"{conc[key][-1].rps:7.0f} req/s (x{concurrency})", file=sys.stderr, flush=True)
            per_round.append(row)
    figures = {k: _pool(k, seq[k], conc[k], cpu[k]) for k in targets}
    ref = figures["reference json"]
    ratios = {k: {"p50_lower_x": ref.p50_ms / f.p50_ms, "throughput_higher_x": f.rps / ref.rps,
                  "server_cpu_lower_x": ref.server_cpu_us_per_request / f.server_cpu_us_per_request}
              for k, f in figures.items() if k != "reference json"}
    return {"model": name, "onnx": str(onnx_path), "input_shape": list(x.shape), "threads": threads,
            "rounds": rounds, "sequential_per_round": sequential, "concurrent_per_round": concurrent,
            "concurrency": concurrency, "cpus": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "figures": {k: asdict(f) for k, f in figures.items()}, "ratios": ratios, "per_round": per_round}


def format_report(report: dict) -> str:
    lines = [f"model {report['model']} {report['input_shape']}, onnxruntime threads {report['threads']}, "
             f"{report['rounds']} interleaved rounds, {report['cpus']} CPUs, {report['date']}",
             f"{'target':16s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'req/s x' + str(report['concurrency']):>12s} "
             f"{'errors':>7s} {'server CPU us/req':>18s} {'generator CPU us/req':>21s}"]
    for f in report["figures"].values():
        lines.append(f"{f['name']:16s} {f['p50_ms']:8.3f} {f['p90_ms']:8.3f} {f['p99_ms']:8.3f} {f['rps']:12.0f} "
                     f"{f['errors']:7d} {f['server_cpu_us_per_request']:18.0f} "
                     f"{f['generator_cpu_us_per_request']:21.0f}")
    for key, r in report["ratios"].items():
        lines.append(f"{key} vs reference: p50 {r['p50_lower_x']:.2f}x lower, throughput "
                     f"{r['throughput_higher_x']:.2f}x higher, server CPU per request {r['server_cpu_lower_x']:.2f}x lower")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bnfold.bench.compare_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="the model both services load (LeNet model.onnx)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds over the three targets (default 3)")
    parser.add_argument("--sequential", type=int, default=1000, help="requests per round on one connection")
    parser.add_argument("--concurrent", type=int, default=4000, help="requests per round over --concurrency")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="connections of the throughput part (default 8)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the figures as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_comparison(
        "compare_reference", args,
        lambda: compare(args.onnx, rounds=args.rounds, sequential=args.sequential, concurrent=args.concurrent,
                        concurrency=args.concurrency),
        format_report, (ServeError,))


if __name__ == "__main__":
    sys.exit(main())
