"""`bnfold serve --ray` beside the plain Ray Serve deployment and beside `bnfold serve` itself, in one run.

    python -m bnfold.bench.compare_ray --onnx runs/lenet/export/model.onnx

One 2-node loopback Ray cluster (`ray start --head` + `ray start --address`, each `--num-cpus 1`,
bench.ray_cluster) carries both Ray applications at once, each with 2 replicas:

- "plain Ray Serve": bench.ray_plain, an onnxruntime session in a `@serve.deployment` class with a
  Starlette handler and a JSON body, as Ray's documentation shows (POST /plain/predict);
- "bnfold on Ray": `bnfold serve MODEL --ray ADDRESS --replicas 2 --grpc-port P` (binary tensors,
  tritonclient's default, JSON tensors, and gRPC through Ray's gRPC proxy, which with two
  applications on the cluster wants the metadata `application: bnfold` on every call);

and "bnfold direct" is `bnfold serve` as one process beside the cluster. Both Ray applications
share the cluster's two CPUs, so each replica reserves half of one (`--replica-cpus 0.5`); every
onnxruntime session has one intra-op thread. Rounds alternate between the targets, each measuring
sequential latency (one connection) and throughput (`--concurrency` connections) with
`bench.loadtest`; latencies pool over rounds, throughput is total requests over total time.
Ray Serve settings that its proxies and replicas read at start (RAY_SERVE_*) go to every node with
`--ray-env KEY=VALUE`; they are cluster-wide, so comparing them takes one run each. With
`--ray-env RAY_SERVE_ENABLE_DIRECT_INGRESS=1` (or RAY_SERVE_THROUGHPUT_OPTIMIZED=1) each Ray
application is also measured at its replicas' own ports (the deploys print them), connections
spread over the replicas; the headline ratio is then bnfold there against the plain deployment
through Ray's proxy, and the same-path ratios are reported beside it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bnfold.bench.grpc_load import run_grpc_loadtest
from bnfold.bench.loadtest import LoadtestResult, run_loadtest
from bnfold.bench.ray_cluster import RAY_VERSION, loopback_cluster, ray_python
from bnfold.bench.comparison import pool, run_comparison
from bnfold.serve.launch import free_port, running_server
from bnfold.serve.config import RAY_DIRECT_LINE as DIRECT_LINE
from bnfold.serve.runtime import ServeError, open_session


def _run(command: list[str], env: dict[str, str], what: str) -> list[str]:
    """Run a deploy command; the replicas' own URLs it printed (Ray's direct ingress), else []."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise ServeError(f"{what} failed (exit {result.returncode}):\n{result.stderr[-3000:]}", status=500)
    for line in result.stderr.splitlines():
        if line.startswith(DIRECT_LINE):
            return [word for word in line[len(DIRECT_LINE):].split() if word.startswith("http://")]
    return []


def compare(onnx_path: str | os.PathLike, *, rounds: int = 3, sequential: int = 300, concurrent: int = 1000,
            concurrency: int = 8, ray_env: dict[str, str] | None = None, serve_args: list[str] | None = None) -> dict:
    """Measure the three targets interleaved on one loopback cluster; the pooled figures and the ratios."""
    onnx_path = Path(onnx_path).resolve()
    runtime = open_session(onnx_path, threads=1, warmup=False)
    name = runtime.name
    x = np.random.default_rng(0).standard_normal(runtime.sample_input(1).shape).astype(np.float32)
    python = ray_python()
    started = time.monotonic()
    with loopback_cluster(python, nodes=2, cpus_per_node=1, env=ray_env) as cluster:
        cluster_s = time.monotonic() - started
        port, grpc_port = free_port(), free_port()
        started = time.monotonic()
        ours_direct = _run([str(python), "-m", "bnfold.serve", str(onnx_path), "--ray", cluster.address,
                            "--replicas", "2", "--replica-cpus", "0.5", "--threads", "1", "--port", str(port),
                            "--grpc-port", str(grpc_port), *(serve_args or [])], cluster.env, "bnfold serve --ray")
        deploy_s = time.monotonic() - started
        plain_direct = _run([str(python), "-m", "bnfold.bench.ray_plain", str(onnx_path), "--address",
                             cluster.address, "--replicas", "2", "--replica-cpus", "0.5", "--port", str(port)],
                            cluster.env, "the plain deployment")
        on_ray = f"http://127.0.0.1:{port}"
        with running_server(onnx_path, threads=1) as direct:
            targets = {
                "plain Ray Serve": lambda c, n: run_loadtest(f"{on_ray}/plain", None, concurrency=c, requests=n,
                                                             reference=True, inputs=x),
                "bnfold on Ray": lambda c, n: run_loadtest(on_ray, name, concurrency=c, requests=n, inputs=x),
                "bnfold on Ray, JSON": lambda c, n: run_loadtest(on_ray, name, concurrency=c, requests=n,
                                                                 binary=False, inputs=x),
                # Ray's gRPC proxy picks the application from the call's metadata (two are deployed)
                "bnfold on Ray, gRPC": lambda c, n: run_grpc_loadtest(
                    f"127.0.0.1:{grpc_port}", name, concurrency=c, requests=n, inputs=x,
                    metadata=(("application", "bnfold"),)),
                "bnfold direct": lambda c, n: run_loadtest(direct, name, concurrency=c, requests=n, inputs=x),
            }
            if plain_direct and ours_direct:   # Ray's direct ingress: each replica on its own port
                targets["plain Ray Serve, direct ingress"] = lambda c, n: run_loadtest(
                    f"{plain_direct[0]}/plain", None, concurrency=c, requests=n, reference=True, inputs=x,
                    replicas=[f"{u}/plain" for u in plain_direct[1:]])
                targets["bnfold on Ray, direct ingress"] = lambda c, n: run_loadtest(
                    ours_direct[0], name, concurrency=c, requests=n, inputs=x, replicas=ours_direct[1:])
            seq: dict[str, list[LoadtestResult]] = {k: [] for k in targets}
            conc: dict[str, list[LoadtestResult]] = {k: [] for k in targets}
            for r in range(rounds):
                for key, drive in targets.items():
                    seq[key].append(drive(1, sequential))
                    conc[key].append(drive(concurrency, concurrent))
                    print(f"round {r + 1}/{rounds} {key:20s} p50 {seq[key][-1].p50_ms:7.3f} ms  "
                          f"{conc[key][-1].rps:7.0f} req/s (x{concurrency}), errors "
                          f"{seq[key][-1].errors + conc[key][-1].errors}", file=sys.stderr, flush=True)
    figures = {k: pool(k, seq[k], conc[k]) for k in targets}
    plain = figures["plain Ray Serve"]
    # bnfold on Ray at its best path on this cluster, against the yardstick as Ray's docs show it
    # (through Ray's proxy); the same-path ratios are reported beside it.
    ours = figures.get("bnfold on Ray, direct ingress", figures["bnfold on Ray"])
    same_path = {"through the proxy": ("bnfold on Ray", "plain Ray Serve"),
                 "direct ingress": ("bnfold on Ray, direct ingress", "plain Ray Serve, direct ingress")}
    return {"model": name, "onnx": str(onnx_path), "input_shape": list(x.shape), "ray": RAY_VERSION,
            "ray_env": ray_env or {}, "serve_args": serve_args or [], "rounds": rounds, "sequential_per_round": sequential,
            "concurrent_per_round": concurrent, "concurrency": concurrency, "cpus": len(os.sched_getaffinity(0)),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "cluster_start_s": round(cluster_s, 1), "bnfold_deploy_s": round(deploy_s, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "figures": {k: asdict(f) for k, f in figures.items()},
            "bnfold_on_ray": ours.name,
            "bnfold_on_ray_vs_plain": {"throughput_x": ours.rps / plain.rps, "p50_x": ours.p50_ms / plain.p50_ms},
            "same_path": {path: {"throughput_x": figures[a].rps / figures[b].rps,
                                 "p50_x": figures[a].p50_ms / figures[b].p50_ms}
                          for path, (a, b) in same_path.items() if a in figures and b in figures},
            "direct_vs_on_ray": {"throughput_x": figures["bnfold direct"].rps / ours.rps,
                                 "p50_x": figures["bnfold direct"].p50_ms / ours.p50_ms}}


def format_report(report: dict) -> str:
    lines = [f"{report['model']} {report['input_shape']}, ray {report['ray']} {report['ray_env'] or ''} "
             f"{' '.join(report['serve_args'])}, "
             f"{report['rounds']} rounds x ({report['sequential_per_round']} sequential + "
             f"{report['concurrent_per_round']} at x{report['concurrency']}), load {' '.join(report['loadavg'])}",
             "| target | p50 ms | p90 ms | p99 ms | req/s (x%d) | errors |" % report["concurrency"],
             "|---|---|---|---|---|---|"]
    for f in report["figures"].values():
        lines.append(f"| {f['name']} | {f['p50_ms']:.2f} | {f['p90_ms']:.2f} | {f['p99_ms']:.2f} | {f['rps']:.0f} "
                     f"| {f['errors']} |")
    ratio = report["bnfold_on_ray_vs_plain"]
    lines.append(f"{report['bnfold_on_ray']} vs plain Ray Serve (through Ray's proxy): "
                 f"throughput {ratio['throughput_x']:.2f}x, p50 {ratio['p50_x']:.2f}x")
    for path, ratio in report.get("same_path", {}).items():
        lines.append(f"same path, {path}: bnfold vs plain throughput {ratio['throughput_x']:.2f}x, "
                     f"p50 {ratio['p50_x']:.2f}x")
    ratio = report["direct_vs_on_ray"]
    lines.append(f"bnfold direct vs on Ray: throughput {ratio['throughput_x']:.2f}x, p50 {ratio['p50_x']:.2f}x")
    return "\n".join(lines)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("RAY_"):
        raise argparse.ArgumentTypeError(f"expected RAY_...=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bnfold.bench.compare_ray",
                                description="bnfold on Ray Serve vs a plain Ray Serve deployment vs bnfold serve, "
                                            "on a 2-node loopback Ray cluster, in one run")
    p.add_argument("--onnx", required=True, help="the ONNX file all three serve")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each measures every target once, in turn")
    p.add_argument("--sequential", type=int, default=300, help="timed requests on one connection per round")
    p.add_argument("--concurrent", type=int, default=1000, help="timed requests over --concurrency connections per round")
    p.add_argument("--concurrency", type=int, default=8, help="connections for the throughput figure")
    p.add_argument("--ray-env", type=_env_pair, action="append", default=[], metavar="RAY_...=VALUE",
                   help="a Ray setting for every node of the cluster (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1); repeatable")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for `bnfold serve --ray` (e.g. --serve-arg=--max-ongoing-requests=5); "
                        "repeatable")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_comparison(
        "compare_ray", args,
        lambda: compare(args.onnx, rounds=args.rounds, sequential=args.sequential, concurrent=args.concurrent,
                        concurrency=args.concurrency, ray_env=dict(args.ray_env), serve_args=args.serve_arg),
        format_report, (ServeError,))


if __name__ == "__main__":
    sys.exit(main())
