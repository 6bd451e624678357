"""Measure the service's limits under the attacks of issue 22, against a real `bnfold serve` on 127.0.0.1.

    python -m bnfold.bench.limits_probe MODEL.onnx [--rounds 200]

MODEL.onnx takes one 1x28x28 grey image (the tiny test model or an exported LeNet). The server
runs with its default limits and `--threads 1`. Printed, one line each:

- idle: 8 connections that send only a head declaring a 16 MiB body, then `--rounds` binary
  /infer requests one after another: their statuses and latency (p50/p90/p99/max);
- decode: 8 concurrent uploads of a 40-megapixel 16-bit grey PNG while a 28x28 PNG is uploaded
  over and over: the statuses, the server's peak RSS growth (sampled every 5 ms), the 28x28
  latencies;
- pipeline: `--rounds` connections each sending a health check and garbage in one packet: how
  many got the 200 before the 400, and the tracebacks in the server's log;
- pbtxt: parsing an 800 KB config.pbtxt (seconds).

Every loop is bounded in count and time; the machine's load is printed with the figures.
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .timing import latency_stats


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _percentiles(ms: list[float]) -> str:
    q = latency_stats(ms)
    return (f"p50 {q['p50_ms']:.2f} ms, p90 {q['p90_ms']:.2f} ms, p99 {q['p99_ms']:.2f} ms, "
            f"max {max(ms):.2f} ms (n={len(ms)})")


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def probe_idle(url: str, rounds: int) -> str:
    import httpx

    host, port = url.removeprefix("http://").split(":")
    head = b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 16777216\r\n\r\n"
    x = np.zeros((1, 1, 28, 28), np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    with httpx.Client(base_url=url, timeout=10) as client:
        model = client.get("/v2/repository/index").json()[0]["name"]
        idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(8)]
        try:
            for sock in idle:
                sock.sendall(head % model.encode())
            time.sleep(0.2)
            statuses, ms = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                r = client.post(f"/v2/models/{model}/infer", content=header + x.tobytes(),
                                headers={"Inference-Header-Content-Length": str(len(header))})
                ms.append((time.perf_counter() - start) * 1e3)
                statuses.append(r.status_code)
        finally:
            for sock in idle:
                sock.close()
    return f"idle: 8 connections declaring 16 MiB; {statuses.count(200)}/{rounds} infer answered 200; {_percentiles(ms)}"


def probe_decode(url: str, pid: int, uploads: int = 8) -> str:
    import httpx

    big = _png(np.full((5000, 8000), 30000, np.uint16))        # 40 megapixels, 16-bit grey
    small = _png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    with httpx.Client(base_url=url, timeout=60) as client:
        model = client.get("/v2/repository/index").json()[0]["name"]
        before = _rss_kb(pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kb(pid))
                time.sleep(0.005)

        small_ms: list[float] = []
        small_codes: list[int] = []

        def small_loop() -> None:
            with httpx.Client(base_url=url, timeout=60) as own:
                while not done.is_set() and len(small_ms) < 2000:
                    start = time.perf_counter()
                    small_codes.append(own.post(f"/predictions/{model}", content=small).status_code)
                    small_ms.append((time.perf_counter() - start) * 1e3)
                    time.sleep(0.01)

        sampler, smalls = threading.Thread(target=sample), threading.Thread(target=small_loop)
        sampler.start()
        smalls.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(uploads) as pool:
            codes = list(pool.map(lambda _: client.post(f"/predictions/{model}", content=big).status_code,
                                  range(uploads)))
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
        smalls.join()
    return (f"decode: {uploads} concurrent 40 Mpx 16-bit PNGs ({len(big)} bytes each): statuses {codes} in "
            f"{elapsed:.1f} s; peak RSS {before / 1024:.0f} -> {peak[0] / 1024:.0f} MB (+{(peak[0] - before) / 1024:.0f}); "
            f"28x28 meanwhile: {small_codes.count(200)}/{len(small_codes)} answered 200, {_percentiles(small_ms)}")


def probe_pipeline(url: str, log: Path, rounds: int) -> str:
    host, port = url.removeprefix("http://").split(":")
    ordered = 0
    for _ in range(rounds):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03 garbage\r\n\r\n")
            data = b""
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
        first, second = data.find(b"HTTP/1.1 200"), data.find(b"HTTP/1.1 400")
        ordered += 0 <= first < second
    time.sleep(1.2)   # the refusal log writes at most once a second
    text = log.read_text(errors="replace")
    return (f"pipeline: {ordered}/{rounds} connections got the 200 before the 400; log: "
            f"{text.count('Traceback')} tracebacks, {text.count('refused')} refusal lines")


def probe_pbtxt() -> str:
    from bnfold.serve.repository import parse_pbtxt

    entry = 'parameters { key: "k%d" value: { string_value: "v" } }\n'
    text = 'name: "m"\nmax_batch_size: 8\n' + "".join(entry % i for i in range(14000))
    start = time.perf_counter()
    fields = parse_pbtxt(text, Path("config.pbtxt"))
    elapsed = time.perf_counter() - start
    return f"pbtxt: {len(text) / 1e3:.0f} KB, {len(fields['parameters'])} entries parsed in {elapsed:.2f} s"


def main(argv: list[str] | None = None) -> int:
    from bnfold.serve.launch import running_server

    p = argparse.ArgumentParser(prog="python -m bnfold.bench.limits_probe", description=__doc__.split("\n")[0])
    p.add_argument("model", help="an ONNX classifier of 1x28x28 grey images with a bnfold spec")
    p.add_argument("--rounds", type=int, default=200, help="infer requests and pipelined connections (default 200)")
    args = p.parse_args(argv)
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        pids: list[int] = []
        with running_server(args.model, threads=1, log_path=log, extra_args=["--no-access-log"],
                            on_ready=lambda proc: pids.append(proc.pid)) as url:
            print(probe_idle(url, args.rounds), flush=True)
            print(probe_decode(url, pids[0]), flush=True)
            print(probe_pipeline(url, log, args.rounds), flush=True)
    print(probe_pbtxt())
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
