"""A load generator that is not the bottleneck: asyncio, raw keep-alive HTTP/1.1, pre-encoded requests.

Each of `concurrency` connections sends its share of the requests back to back, timing each
from the first byte written to the last byte read. Requests are encoded once; a response
counts as an error unless it is a 200 whose body equals the first 200 answer to the same input
(the service is deterministic), so a load test also checks that answers do not change or mix
under concurrency.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bnfold.bench.timing import latency_stats
from bnfold.serve.runtime import V2_TO_NUMPY, ServeError


TENSOR_ENCODINGS = ("binary", "json")
PROTOCOLS = ("http", "grpc")


@dataclass
class LoadtestConfig:
    """One `bnfold loadtest` run: which server and model, how many requests over how many connections."""

    url: str                             # the server's base URL
    name: str | None = None              # the model's name on the server (as `bnfold serve --name`)
    concurrency: int = 8
    requests: int = 2000
    tensors: str = "binary"              # binary (the binary tensor extension) or json
    reference: bool = False              # the reference FastAPI service's POST /predict instead of /v2
    input_shape: tuple[int, ...] | None = None
    protocol: str = "http"               # http, or grpc (to `bnfold serve --grpc-port`)
    replica_urls: tuple[str, ...] = ()   # more base URLs of the same model (direct-ingress replicas)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ServeError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        self.replica_urls = tuple(self.replica_urls)
        if self.replica_urls and self.protocol != "http":
            raise ServeError("--replica-urls spreads HTTP connections; it does not apply to --protocol grpc")
        if self.tensors not in TENSOR_ENCODINGS:
            raise ServeError(f"--tensors must be one of {', '.join(TENSOR_ENCODINGS)}, got {self.tensors!r}")
        # --concurrency, --requests and --name are run_loadtest's checks, which library callers get too.


@dataclass
class LoadtestResult:
    """Latency percentiles over all timed requests and throughput over the whole run."""

    url: str
    mode: str                 # "binary", "json" or "reference"
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_us: float = 0.0  # the generator's own CPU time per timed request (it must stay small)
    first_error: str | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_tally(cls, url: str, mode: str, concurrency: int, tally: _Tally, seconds: float,
                   cpu: float) -> LoadtestResult:
        """The result of a timed run: `tally`'s latencies, over `seconds` of wall and `cpu` of client time."""
        ms = np.asarray(tally.latencies) * 1e3
        stats = latency_stats(ms)
        return cls(url=url, mode=mode, concurrency=concurrency, requests=len(ms), errors=tally.errors,
                   seconds=seconds, rps=len(ms) / seconds if seconds > 0 else 0.0,
                   p50_ms=stats["p50_ms"], p90_ms=stats["p90_ms"], p99_ms=stats["p99_ms"],
                   mean_ms=stats["mean_ms"], client_cpu_us=cpu / max(1, len(ms)) * 1e6,
                   first_error=tally.first_error, latencies_ms=ms.tolist())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies_ms")
        return data

    def __str__(self) -> str:
        text = (f"{self.mode} x{self.concurrency}: {self.requests} requests in {self.seconds:.2f} s, "
                f"{self.rps:.0f} req/s; latency p50 {self.p50_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, "
                f"p99 {self.p99_ms:.3f} ms, mean {self.mean_ms:.3f} ms; errors {self.errors}; "
                f"generator CPU {self.client_cpu_us:.0f} us/request")
        if self.first_error:
            text += f" (first: {self.first_error})"
        return text


def request_inputs(inputs: np.ndarray | list[np.ndarray] | None, shape: tuple[int, ...], datatype: str,
                   seed: int) -> list[np.ndarray]:
    """The arrays a load test sends: the caller's (one array or a list), else 4 random arrays of `shape`."""
    if inputs is None:
        rng = np.random.default_rng(seed)
        dtype = V2_TO_NUMPY.get(datatype, np.dtype(np.float32))
        return [rng.standard_normal(shape).astype(dtype) for _ in range(4)]
    return [inputs] if isinstance(inputs, np.ndarray) else inputs


def _split(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http" or not parts.hostname:
        raise ServeError(f"expected a URL like http://127.0.0.1:8000, got {url!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


def _ask(url: str, method: str, path: str) -> tuple[int, bytes]:
    """One request to a running server: (status, body); a server that is not there, or that does not
    speak HTTP (a gRPC port), is one ServeError saying so."""
    host, port, base = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, f"{base}{path}")
        response = conn.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as exc:
        raise ServeError(f"{url} did not answer in HTTP ({type(exc).__name__}); if it is the port of "
                         f"`bnfold serve --grpc-port`, add --protocol grpc")
    except OSError as exc:
        raise ServeError(f"cannot reach {url}: {exc}")
    finally:
        conn.close()


def served_models(url: str) -> list[str]:
    """The names of the models a running v2 server holds (POST /v2/repository/index)."""
    status, body = _ask(url, "POST", "/v2/repository/index")
    try:
        return sorted({entry["name"] for entry in json.loads(body)}) if status == 200 else []
    except (ValueError, TypeError, KeyError):
        return []


def fetch_model_metadata(url: str, model: str) -> dict[str, Any]:
    """GET /v2/models/{model} from a running v2 server."""
    status, body = _ask(url, "GET", f"/v2/models/{model}")
    if status != 200:
        raise ServeError(f"{url} answered {status} for model {model!r}: {body[:300].decode(errors='replace')}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ServeError(f"{url} answered model {model!r}'s metadata with something other than JSON: {exc}")


def encode_request(host: str, path: str, body: bytes, extra_headers: dict[str, str]) -> bytes:
    """One complete HTTP/1.1 request, ready to write."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in extra_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def v2_request(host: str, base: str, model: str, input_name: str, datatype: str, x: np.ndarray,
               binary: bool) -> bytes:
    """An Open Inference Protocol infer request for `x`, binary extension or JSON tensors."""
    tensor: dict[str, Any] = {"name": input_name, "shape": list(x.shape), "datatype": datatype}
    path = f"{base}/v2/models/{model}/infer"
    if binary:
        data = np.ascontiguousarray(x).tobytes()
        tensor["parameters"] = {"binary_data_size": len(data)}
        header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
        return encode_request(host, path, header + data,
                              {"Inference-Header-Content-Length": str(len(header)),
                               "Content-Type": "application/octet-stream"})
    tensor["data"] = x.ravel().tolist()
    return encode_request(host, path, json.dumps({"inputs": [tensor]}).encode(),
                          {"Content-Type": "application/json"})


def reference_request(host: str, base: str, x: np.ndarray) -> bytes:
    """The reference FastAPI service's `POST /predict {"data": [floats]}`."""
    body = json.dumps({"data": x.ravel().astype(np.float64).tolist()}).encode()
    return encode_request(host, f"{base}/predict", body, {"Content-Type": "application/json"})


class _Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error: str | None = None
        self.expected: dict[int, bytes] = {}

    def record(self, index: int, status: int, body: bytes, seconds: float | None) -> None:
        if seconds is not None:
            self.latencies.append(seconds)
        if status != 200:
            problem = f"HTTP {status}: {body[:200].decode(errors='replace')}"
        else:
            expected = self.expected.setdefault(index, body)
            if body == expected:
                return
            problem = f"answer to input {index} differs from its first answer"
        if seconds is not None:
            self.errors += 1
        if self.first_error is None:
            self.first_error = problem


def _dechunk(buffer: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A chunked body starting at `pos`: (body, end of the message), or None while incomplete."""
    parts = []
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
        if size == 0:   # the last chunk, then trailer fields (none, usually) and an empty line
            end = buffer.find(b"\r\n\r\n", line_end)
            return None if end < 0 else (b"".join(parts), end + 4)
        start = line_end + 2
        if len(buffer) < start + size + 2:
            return None
        parts.append(bytes(buffer[start:start + size]))
        pos = start + size + 2


class _Connection(asyncio.Protocol):
    """One keep-alive connection that sends the next request from inside `data_received`.

    Callbacks instead of stream coroutines: no task switch per response, so the generator's
    own cost per request stays a small fraction of what it measures.
    """

    def __init__(self, requests: list[bytes], offset: int, tally: _Tally) -> None:
        self.requests = requests
        self.offset = offset
        self.tally = tally
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future | None = None
        self.lost: BaseException | None = None
        self._need = -1           # total bytes of the response being read; -1 while its head is incomplete
        self._body_at = 0
        self._status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def run(self, count: int, timed: bool) -> asyncio.Future:
        """Send `count` requests back to back; the future resolves after the last response."""
        self.done = asyncio.get_running_loop().create_future()
        self.remaining, self.timed, self.sent = count, timed, 0
        if self.lost is not None:
            self.done.set_exception(ConnectionError(f"connection lost: {self.lost}"))
        elif count == 0:
            self.done.set_result(None)
        else:
            self._send()
        return self.done

    def _send(self) -> None:
        self.index = (self.offset + self.sent) % len(self.requests)
        self.sent += 1
        self.start = time.perf_counter()
        self.transport.write(self.requests[self.index])

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self._need < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                self._status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                self._body_at = end + 4
                if at < 0:
                    if b"\r\ntransfer-encoding: chunked" not in head:   # what KServe's ModelServer sends
                        self._fail(ServeError(f"response without Content-Length: {head[:200]!r}"))
                        return
                    self._need = 0   # chunked: the end is known once the last chunk is in
                else:
                    stop = head.find(b"\r\n", at + 2)
                    length = int(head[at + 17:stop if stop > 0 else len(head)])
                    self._need = self._body_at + length
            if self._need == 0:
                chunked = _dechunk(buffer, self._body_at)
                if chunked is None:
                    return
                body, self._need = chunked
            elif len(buffer) < self._need:
                return
            else:
                body = bytes(buffer[self._body_at:self._need])
            elapsed = time.perf_counter() - self.start
            del buffer[:self._need]
            self._need = -1
            self.tally.record(self.index, self._status, body, elapsed if self.timed else None)
            self.remaining -= 1
            if self.remaining > 0:
                self._send()
            elif not self.done.done():
                self.done.set_result(None)
                return

    def _fail(self, exc: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionError("closed by the server")
        self._fail(ConnectionError(f"connection lost: {self.lost}"))


async def _drive(endpoints: list[tuple[str, int]], requests: list[bytes], concurrency: int, total: int,
                 warmup: int) -> tuple[_Tally, float, float]:
    tally = _Tally()
    loop = asyncio.get_running_loop()
    connections: list[_Connection] = []
    try:
        for c in range(concurrency):
            host, port = endpoints[c % len(endpoints)]   # connection c to endpoint c mod n
            _, protocol = await loop.create_connection(lambda c=c: _Connection(requests, c, tally), host, port)
            connections.append(protocol)
        # The first answer to each input is taken on one connection before the load starts.
        first = connections[0]
        for index in range(len(requests)):
            first.offset = index
            await first.run(1, timed=False)
        first.offset = 0
        await asyncio.gather(*(conn.run(warmup, timed=False) for conn in connections))
        shares = [total // concurrency + (1 if c < total % concurrency else 0) for c in range(concurrency)]
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(conn.run(shares[c], timed=True) for c, conn in enumerate(connections)))
        return tally, time.perf_counter() - start, time.process_time() - cpu
    finally:
        for conn in connections:
            if conn.transport is not None:
                conn.transport.close()


def _run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def run_loadtest(url: str, model: str | None, *, concurrency: int = 8, requests: int = 2000,
                 binary: bool = True, inputs: np.ndarray | list[np.ndarray] | None = None,
                 reference: bool = False, input_shape: tuple[int, ...] | None = None,
                 warmup: int = 10, seed: int = 0, protocol: str = "http",
                 replicas: Sequence[str] = ()) -> LoadtestResult:
    """Send `requests` inferences over `concurrency` keep-alive connections and time them.

    url: server base URL. model: the v2 model name (ignored with `reference`). inputs: one
    array or a list cycled through (default: 4 random arrays of the model's batch-1 shape).
    reference: drive the reference FastAPI service's `POST /predict` instead of v2.
    warmup: untimed requests per connection before its timed ones.
    protocol: "http", or "grpc" for ModelInfer calls to the gRPC address `url` ("host:port", the
    port of `bnfold serve --grpc-port`), raw tensor contents (`bench.grpc_load`).
    replicas: more base URLs (HTTP) serving the same model under the same path, such as the replicas
    Ray Serve's direct ingress opens; connection i then goes to [url, *replicas][i mod n], which is
    what a client-side load balancer does. Every answer is still checked against the first one.
    """
    if concurrency < 1 or requests < 1:
        raise ServeError(f"concurrency and requests must be at least 1, got {concurrency} and {requests}")
    if protocol == "grpc":
        if reference or not binary:
            raise ServeError("--protocol grpc sends tensors as raw contents; --json and --reference are HTTP's")
        from .grpc_load import run_grpc_loadtest

        return run_grpc_loadtest(url, model, concurrency=concurrency, requests=requests, inputs=inputs,
                                 input_shape=input_shape, warmup=warmup, seed=seed)
    if protocol != "http":
        raise ServeError(f"--protocol must be http or grpc, got {protocol!r}")
    host, port, base = _split(url)
    if reference:
        shape = input_shape or (1, 1, 28, 28)
        datatype, input_name = "FP32", None
    else:
        if not model:
            names = served_models(url)
            raise ServeError("--name is required for an Open Inference Protocol server: the model's name on it "
                             f"({url} serves {', '.join(names) if names else 'no model'})")
        meta = fetch_model_metadata(url, model)
        first = meta["inputs"][0]
        datatype, input_name = first["datatype"], first["name"]
        shape = input_shape or tuple(1 if d == -1 else d for d in first["shape"])
    inputs = request_inputs(inputs, shape, datatype, seed)
    if reference:
        encoded = [reference_request(host, base, x) for x in inputs]
        mode = "reference"
    else:
        encoded = [v2_request(host, base, model, input_name, datatype, x, binary) for x in inputs]
        mode = "binary" if binary else "json"
    try:
        endpoints = [(host, port)] + [_split(other)[:2] for other in replicas]
        tally, seconds, cpu = _run(_drive(endpoints, encoded, concurrency, requests, warmup))
    except (OSError, ConnectionError) as exc:
        raise ServeError(f"load test against {url} failed: {type(exc).__name__}: {exc}")
    return LoadtestResult.from_tally(url, mode, concurrency, tally, seconds, cpu)
