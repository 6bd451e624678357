"""bnfold's server beside KServe's own `ModelServer` on the same ONNX file, in one run, with the same clients.

    python -m bnfold.bench.compare_kserve --onnx runs/lenet/export/model.onnx

KServe's Python SDK (the standard Python Open Inference Protocol v2 server) runs the ~40-line
model class in `bench/kserve_model.py` (an onnxruntime session at one intra-op thread) in its own
virtual environment, built on first use (`bench.peers.peer_python("kserve")`: its pins clash with
bnfold's). bnfold runs as `bnfold serve --threads 1 --grpc-port P`. Each keeps its default logging
(bnfold's JSON-lines access log; KServe's access log and per-request latency log). Both listen on
127.0.0.1 only.

Each round measures, alternating the two servers (which goes first alternates too):
- HTTP binary tensors, one connection: `bench.loadtest`, p50 (the binary tensor extension);
- HTTP JSON tensors, one connection: `bench.loadtest`, p50;
- throughput over 8 connections, binary tensors: `bench.loadtest`, requests per second;
- gRPC, one connection: unmodified `tritonclient.grpc.InferenceServerClient.infer`, p50.
After each round's gRPC measure the same client times `bench.grpc_floor` (grpc.aio answering
prebuilt bytes): grpcio's own cost, the floor under any server built on it. Latencies are pooled
over rounds; throughput is total requests over total time. Every answer is
checked (the load generator compares each with the first answer to its input; the gRPC loop
compares every output), and both servers' outputs are compared with in-process onnxruntime first.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.versions import cpu_name
from bnfold.serve.launch import free_port, running_server, server_process
from bnfold.serve.runtime import ServeError, open_session

from .loadtest import run_loadtest
from .peers import PeerError, peer_python
from .timing import latency_stats
from bnfold.bench.comparison import run_comparison

KSERVE_MODEL = Path(__file__).with_name("kserve_model.py")
SERVERS = ("bnfold", "kserve")
# (key, what it is, how the ratio reads): lower latency or higher throughput is better.
MEASURES = [("http_binary_p50_ms", "HTTP binary tensors, p50"), ("http_json_p50_ms", "HTTP JSON, p50"),
            ("rps_8conn", "throughput, 8 connections (binary)"), ("grpc_p50_ms", "gRPC (tritonclient.grpc), p50")]
TARGETS = {"http_binary_p50_ms": 3.0, "http_json_p50_ms": 2.5, "rps_8conn": 4.0, "grpc_p50_ms": 2.0}


@contextlib.contextmanager
def kserve_server(onnx_path: str | os.PathLike, name: str, *, threads: int = 1,
                  startup_timeout: float = 180.0) -> Iterator[tuple[str, str]]:
    """KServe's ModelServer serving `onnx_path` as `name`; yields (HTTP URL, gRPC address)."""
    python = peer_python("kserve")
    http_port, grpc_port = free_port(), free_port()
    command = [str(python), str(KSERVE_MODEL), "--onnx", str(Path(onnx_path).resolve()), "--model_name", name,
               "--http_port", str(http_port), "--grpc_port", str(grpc_port), "--threads", str(threads)]
    with server_process(command, http_port, ready_path=f"/v2/models/{name}/ready",
                        startup_timeout=startup_timeout) as url:
        _wait_for_grpc(f"127.0.0.1:{grpc_port}")
        yield url, f"127.0.0.1:{grpc_port}"


@contextlib.contextmanager
def bnfold_server(onnx_path: str | os.PathLike, name: str, *, threads: int = 1) -> Iterator[tuple[str, str]]:
    """`bnfold serve --threads N --grpc-port P` on `onnx_path` as `name`; yields (HTTP URL, gRPC address)."""
    grpc_port = free_port()
    with running_server(onnx_path, threads=threads, name=name, extra_args=["--grpc-port", str(grpc_port)]) as url:
        _wait_for_grpc(f"127.0.0.1:{grpc_port}")
        yield url, f"127.0.0.1:{grpc_port}"


@contextlib.contextmanager
def grpc_floor_server(answer: bytes, directory: Path) -> Iterator[str]:
    """`bench.grpc_floor` (grpc.aio answering every ModelInfer with `answer`); yields its address."""
    port = free_port()
    answer_file = directory / "floor-answer.bin"
    answer_file.write_bytes(answer)
    process = subprocess.Popen([sys.executable, "-m", "bnfold.bench.grpc_floor", "--grpc-port", str(port),
                                "--answer", str(answer_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_grpc(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _real_answer(address: str, name: str, input_name: str, x: np.ndarray) -> bytes:
    """The serialized ModelInferResponse `address` gives for `x` (what the floor server replays)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(address) as channel:
        return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request).SerializeToString()


def _wait_for_grpc(address: str, timeout: float = 60.0) -> None:
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ServeError(f"no gRPC server answered on {address} within {timeout:.0f} s", status=500) from None


def grpc_latencies(address: str, name: str, input_name: str, x: np.ndarray, output: str, count: int,
                   warmup: int = 50) -> tuple[np.ndarray, int, np.ndarray]:
    """`count` sequential `tritonclient.grpc` infers of `x`: (latencies in ms, wrong answers, first answer)."""
    import tritonclient.grpc as triton_grpc

    with triton_grpc.InferenceServerClient(address) as client:
        tensor = triton_grpc.InferInput(input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        outputs = [triton_grpc.InferRequestedOutput(output)]
        first = client.infer(name, [tensor], outputs=outputs).as_numpy(output)
        for _ in range(warmup):
            client.infer(name, [tensor], outputs=outputs)
        times = np.empty(count)
        wrong = 0
        for i in range(count):
            start = time.perf_counter()
            answer = client.infer(name, [tensor], outputs=outputs).as_numpy(output)
            times[i] = time.perf_counter() - start
            wrong += not np.array_equal(answer, first)
    return times * 1e3, wrong, first


def _peer_version(name: str, distribution: str) -> str:
    done = subprocess.run([str(peer_python(name)), "-c", "import importlib.metadata as m, sys; "
                           "print(m.version(sys.argv[1]))", distribution], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def _git_commit() -> str:
    done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"


def compare(onnx_path: str | os.PathLike, *, rounds: int = 3, sequential: int = 1000, concurrent: int = 4000,
            concurrency: int = 8, threads: int = 1) -> dict[str, Any]:
    """Measure bnfold and KServe interleaved; the pooled figures, the ratios and what ran."""
    runtime = open_session(onnx_path, threads=threads, warmup=False)
    name, input_name, output = runtime.name, runtime.inputs[0].name, runtime.outputs[0].name
    x = np.random.default_rng(0).standard_normal(runtime.sample_input(1).shape).astype(np.float32)
    expected = runtime.run(x)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    peer_python("kserve")   # built (once) before anything is timed
    latencies: dict[tuple[str, str], list[np.ndarray]] = {(s, k): [] for s in SERVERS for k, _ in MEASURES}
    throughput: dict[str, list[tuple[int, float]]] = {s: [] for s in SERVERS}
    errors: dict[str, int] = {s: 0 for s in SERVERS}
    first_errors: dict[str, str | None] = {s: None for s in SERVERS}
    floor_ms: list[np.ndarray] = []
    per_round: dict[str, dict[str, list[float]]] = {}   # measure -> server -> that round's p50 (or req/s)
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(bnfold_server(onnx_path, name, threads=threads))
        peer = stack.enter_context(kserve_server(onnx_path, name, threads=threads))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-floor-")))
        floor = stack.enter_context(grpc_floor_server(_real_answer(ours[1], name, input_name, x), scratch))
        addresses = {"bnfold": ours, "kserve": peer}
        for server, (_, grpc_address) in addresses.items():   # each answers what onnxruntime answers here
            _, _, answer = grpc_latencies(grpc_address, name, input_name, x, output, count=1, warmup=0)
            if not np.allclose(answer, expected, rtol=1e-5, atol=1e-6):
                raise ServeError(f"{server} answered {answer.ravel()[:4]}..., in-process onnxruntime "
                                 f"{expected.ravel()[:4]}...", status=500)

        def measure(server: str, key: str) -> None:
            url, grpc_address = addresses[server]
            if key == "grpc_p50_ms":
                ms, wrong, _ = grpc_latencies(grpc_address, name, input_name, x, output, sequential)
                latencies[(server, key)].append(ms)
                errors[server] += wrong
                return
            result = run_loadtest(url, name, concurrency=concurrency if key == "rps_8conn" else 1,
                                  requests=concurrent if key == "rps_8conn" else sequential,
                                  binary=key != "http_json_p50_ms", inputs=x)
            errors[server] += result.errors
            first_errors[server] = first_errors[server] or result.first_error
            if key == "rps_8conn":
                throughput[server].append((result.requests, result.seconds))
            else:
                latencies[(server, key)].append(np.asarray(result.latencies_ms))

        for r in range(rounds):
            order = SERVERS if r % 2 == 0 else SERVERS[::-1]
            for key, label in MEASURES:
                for server in order:
                    measure(server, key)
                    done = throughput[server][-1][0] / throughput[server][-1][1] if key == "rps_8conn" \
                        else float(np.median(latencies[(server, key)][-1]))
                    per_round.setdefault(key, {}).setdefault(server, []).append(round(done, 4))
                if key == "grpc_p50_ms":   # grpcio's own cost, same client: the floor under both
                    floor_ms.append(grpc_latencies(floor, name, input_name, x, output, sequential)[0])
                print(f"round {r + 1}/{rounds} {label}: done", file=sys.stderr, flush=True)
    figures: dict[str, dict[str, Any]] = {}
    for server in SERVERS:
        row: dict[str, Any] = {}
        for key, _ in MEASURES:
            if key == "rps_8conn":
                done = throughput[server]
                row[key] = sum(n for n, _ in done) / sum(s for _, s in done)
                continue
            stats = latency_stats(np.concatenate(latencies[(server, key)]))
            row[key] = stats["p50_ms"]
            row[key.replace("p50", "p90")] = stats["p90_ms"]
            row[key.replace("p50", "p99")] = stats["p99_ms"]
        row["errors"] = errors[server]
        row["first_error"] = first_errors[server]
        figures[server] = row
    ours_f, peer_f = figures["bnfold"], figures["kserve"]
    ratios = {key: (ours_f[key] / peer_f[key] if key == "rps_8conn" else peer_f[key] / ours_f[key])
              for key, _ in MEASURES}
    ratios["grpc_vs_own_http_binary"] = ours_f["grpc_p50_ms"] / ours_f["http_binary_p50_ms"]
    floor_stats = latency_stats(np.concatenate(floor_ms))
    return {"model": name, "onnx": str(onnx_path), "input_shape": list(x.shape), "threads": threads,
            "rounds": rounds, "sequential_per_round": sequential, "concurrent_per_round": concurrent,
            "concurrency": concurrency, "cpus": len(os.sched_getaffinity(0)), "cpu": cpu_name(),
            "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "bnfold_commit": _git_commit(), "kserve_version": _peer_version("kserve", "kserve"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "figures": figures, "ratios": ratios, "targets": TARGETS, "per_round": per_round,
            "grpc_floor": {"p50_ms": floor_stats["p50_ms"], "p90_ms": floor_stats["p90_ms"],
                           "what": "grpc.aio answering every ModelInfer with prebuilt bytes (bench.grpc_floor), "
                                   "same client"}}


def format_report(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table, with what ran and the targets."""
    f, ratios = report["figures"], report["ratios"]
    lines = [f"model {report['model']} {report['input_shape']}, onnxruntime {report['threads']} thread(s) in both, "
             f"{report['rounds']} interleaved rounds of {report['sequential_per_round']} sequential and "
             f"{report['concurrent_per_round']} concurrent requests; {report['cpus']} CPUs ({report['cpu']}); "
             f"load {' '.join(report['loadavg_before'])} before, {' '.join(report['loadavg_after'])} after; "
             f"bnfold {report['bnfold_commit']}, kserve {report['kserve_version']}; {report['date']}",
             "",
             "| | bnfold | KServe ModelServer | ratio | target |",
             "|---|---:|---:|---:|---:|"]
    for key, label in MEASURES:
        unit = " req/s" if key == "rps_8conn" else " ms"
        fmt = (lambda v: f"{v:,.0f}") if key == "rps_8conn" else (lambda v: f"{v:.3f}")
        target = report["targets"][key]
        mark = "met" if ratios[key] >= target else "missed"
        lines.append(f"| {label} | {fmt(f['bnfold'][key])}{unit} | {fmt(f['kserve'][key])}{unit} | "
                     f"{ratios[key]:.2f}x | {target}x ({mark}) |")
    spread = []
    for key, label in MEASURES:
        rounds = report.get("per_round", {}).get(key, {})
        if rounds.get("bnfold") and rounds.get("kserve"):
            each = [(k / b if key != "rps_8conn" else b / k) for b, k in zip(rounds["bnfold"], rounds["kserve"])]
            spread.append(f"{label} {min(each):.2f}x to {max(each):.2f}x")
    if spread:
        lines += ["", "ratio per round: " + "; ".join(spread)]
    own = ratios["grpc_vs_own_http_binary"]
    lines += ["", f"bnfold gRPC p50 / bnfold HTTP binary p50: {own:.2f} (target <= 1.2: "
                  f"{'met' if own <= 1.2 else 'missed'})",
              f"gRPC floor (grpc.aio answering prebuilt bytes, no parsing or model; same client): p50 "
              f"{report['grpc_floor']['p50_ms']:.3f} ms; above it: bnfold "
              f"{f['bnfold']['grpc_p50_ms'] - report['grpc_floor']['p50_ms']:+.3f} ms, KServe "
              f"{f['kserve']['grpc_p50_ms'] - report['grpc_floor']['p50_ms']:+.3f} ms",
              f"errors: bnfold {f['bnfold']['errors']}, kserve {f['kserve']['errors']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnfold.bench.compare_kserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="the ONNX file both servers load (e.g. LeNet's model.onnx)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every measure (default 3)")
    parser.add_argument("--sequential", type=int, default=1000,
                        help="requests per round and server for each one-connection latency (default 1000)")
    parser.add_argument("--concurrent", type=int, default=4000,
                        help="requests per round and server for the throughput measure (default 4000)")
    parser.add_argument("--concurrency", type=int, default=8, help="connections of the throughput measure (default 8)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    return run_comparison(
        "compare_kserve", args,
        lambda: compare(args.onnx, rounds=args.rounds, sequential=args.sequential, concurrent=args.concurrent,
                        concurrency=args.concurrency),
        format_report, (ServeError, PeerError))


if __name__ == "__main__":
    sys.exit(main())
