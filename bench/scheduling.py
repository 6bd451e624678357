"""Serving configurations side by side: instance groups, dynamic batching, or two versions of bnfold.

    python -m bnfold.bench.scheduling MODEL.onnx --config "1 instance=--instances 1" \\
        --config "2 instances=--instances 2" --concurrency 8 --requests 2000 --rounds 3

Every configuration is a `bnfold serve` of the same file started once; then the load test
(`bench.loadtest.run_loadtest`, batch-1 binary or JSON requests over keep-alive connections)
drives them in turn, A B A B ..., so that the machine's background load falls on all of them
alike. Before the rounds, each server answers a fixed set of batch-1 inputs and the answers are
compared bit for bit with onnxruntime in this process: a configuration that changes outputs is
reported, not timed. `SOURCE:` before a configuration's options (`--config "before=/tmp/old:"`)
runs the bnfold source tree at that folder (e.g. `git archive` of an earlier commit) instead of
this one. Figures are medians over the rounds; the load average is read before and after.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import statistics
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold.serve.launch import free_port, server_process

from .loadtest import run_loadtest

# Runs `python -m bnfold.serve` from another source tree laid out like this repository (the
# top-level folders are bnfold's subpackages, so that tree's root joins the package's path).
_OTHER_SOURCE = ("import sys; root = sys.argv.pop(1); sys.path.insert(0, root); import bnfold; "
                 "bnfold.__path__.append(root); import runpy; sys.argv[0] = 'bnfold.serve'; "
                 "runpy.run_module('bnfold.serve', run_name='__main__')")


@dataclass
class Config:
    label: str
    args: list[str]
    source: str | None = None      # another bnfold source tree, or None for this one

    @classmethod
    def parse(cls, text: str) -> Config:
        label, sep, rest = text.partition("=")
        if not sep or not label:
            raise SystemExit(f"--config must be LABEL=OPTIONS, got {text!r}")
        source = None
        head, colon, tail = rest.partition(":")
        if colon and Path(head).is_dir():
            source, rest = head, tail
        return cls(label, shlex.split(rest), source)


def _command(config: Config, model: str, name: str, port: int) -> list[str]:
    head = [sys.executable, "-c", _OTHER_SOURCE, config.source] if config.source else [sys.executable, "-m",
                                                                                        "bnfold.serve"]
    return head + [model, "--name", name, "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                   *config.args]


def _answers(url: str, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    out = []
    try:
        for x in inputs:
            header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": x.nbytes}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            conn.request("POST", f"/v2/models/{name}/infer", header + x.tobytes(),
                         {"Inference-Header-Content-Length": str(len(header))})
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise SystemExit(f"{url}: {response.status} {body[:200]!r}")
            length = int(response.getheader("inference-header-content-length"))
            out.append(np.frombuffer(body[length:], np.float32).copy())
    finally:
        conn.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnfold.bench.scheduling", description=__doc__.split("\n")[0])
    p.add_argument("model", help="the ONNX file every configuration serves")
    p.add_argument("--config", action="append", required=True, metavar="LABEL=[SOURCE:]OPTIONS",
                   help="a configuration: its label, then `bnfold serve` options (repeat; the first is the baseline)")
    p.add_argument("--concurrency", type=int, default=8, help="connections of the load test (default: 8)")
    p.add_argument("--requests", type=int, default=2000, help="requests per round and configuration (default: 2000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of A B ... (default: 3)")
    p.add_argument("--tensors", choices=("binary", "json"), default="binary", help="how tensors travel")
    p.add_argument("--json-out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    import onnxruntime as ort

    configs = [Config.parse(text) for text in args.config]
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = session.get_inputs()[0]
    shape = [1] + [d if isinstance(d, int) else 1 for d in meta.shape[1:]]
    rng = np.random.default_rng(0)
    checks = [rng.standard_normal(shape).astype(np.float32) for _ in range(16)]
    expected = [session.run(None, {meta.name: x})[0].ravel() for x in checks]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, list] = {c.label: [] for c in configs}
    with ExitStack() as stack:
        urls = {}
        for config in configs:
            port = free_port()
            urls[config.label] = stack.enter_context(server_process(_command(config, args.model, "m", port), port))
            same = all(np.array_equal(a, e) for a, e in zip(_answers(urls[config.label], "m", checks), expected))
            print(f"{config.label}: outputs {'bit-identical to' if same else 'DIFFER from'} in-process onnxruntime",
                  flush=True)
        for round_ in range(args.rounds):
            for config in configs:
                r = run_loadtest(urls[config.label], "m", concurrency=args.concurrency, requests=args.requests,
                                 binary=args.tensors == "binary")
                results[config.label].append(r)
                print(f"round {round_ + 1} {config.label:>16}: {r.rps:8.0f} req/s  p50 {r.p50_ms:.3f} ms  "
                      f"p90 {r.p90_ms:.3f}  p99 {r.p99_ms:.3f}  errors {r.errors}", flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    base = configs[0].label
    summary = {}
    for config in configs:
        rs = results[config.label]
        summary[config.label] = {"rps": statistics.median(r.rps for r in rs),
                                 "p50_ms": statistics.median(r.p50_ms for r in rs),
                                 "p99_ms": statistics.median(r.p99_ms for r in rs),
                                 "errors": sum(r.errors for r in rs)}
    print(f"\n{args.model}, {args.tensors} batch-1 requests, {args.concurrency} connections, {args.rounds} rounds "
          f"x {args.requests}, {os.cpu_count()} CPUs; load average {' '.join(load_before)} before, "
          f"{' '.join(load_after)} after")
    print(f"| configuration | req/s | vs {base} | p50 ms | vs {base} | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, s in summary.items():
        print(f"| {label} | {s['rps']:.0f} | {s['rps'] / summary[base]['rps']:.2f}x | {s['p50_ms']:.3f} | "
              f"{s['p50_ms'] / summary[base]['p50_ms']:.2f}x | {s['p99_ms']:.3f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"load_before": load_before, "load_after": load_after,
                                                   "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
