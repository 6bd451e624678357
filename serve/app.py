"""The HTTP service: a plain ASGI callable speaking the Open Inference Protocol v2.

No framework sits on the hot path: routes are chosen by splitting the path, binary tensors are
`numpy.frombuffer` views of the body, constant response parts are encoded once, and a model
that answers in under `INLINE_THRESHOLD_MS` runs right in the event loop (a thread hop would
cost more than the model; slower models go to a worker thread so the server stays responsive).

Endpoints (see `/docs`): health, server and model metadata, `/v2/models/{m}[/versions/{v}]/infer`
(JSON tensors and the binary tensor extension), `POST /predictions/{m}` (an image file, top-k
labels), `/metrics` (Prometheus), `/openapi.json`, `/docs`. Every client mistake is a 4xx with
`{"error": "..."}`; an unexpected failure is a 500 with the exception's type and message, never
a traceback.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Awaitable, Callable, TextIO

import numpy as np
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)

from bnfold.serve import images
from bnfold.serve.docs import docs_html, openapi_document
from bnfold.serve.protocol import RequestParser, ResponseEncoder, parse_header_length
from bnfold.serve.runtime import ModelRuntime, ServeError, load_repository

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SERVER_NAME = "bnfold"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]

log = logging.getLogger("bnfold.serve")

_JSON = [(b"content-type", b"application/json")]
_OCTET = b"application/octet-stream"
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 10.0)


class _Disconnected(Exception):
    """The client went away before the body arrived; nothing to answer."""


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class AccessLog:
    """JSON-lines access log, buffered: one write per batch of lines, not per request.

    Lines are flushed when 256 are pending, when 0.5 s passed since the last flush (checked on
    each request and by a timer the lifespan starts), and at shutdown.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._lines: list[str] = []
        self._last_flush = time.monotonic()

    def write(self, method: str, path: str, status: int, ms: float, client: Any, model: str | None) -> None:
        host = client[0] if client else "-"
        model_part = f',"model":{json.dumps(model)}' if model else ""
        self._lines.append(f'{{"ts":{time.time():.6f},"client":"{host}","method":"{method}",'
                           f'"path":{json.dumps(path)},"status":{status},"ms":{ms:.3f}{model_part}}}\n')
        if len(self._lines) >= 256 or time.monotonic() - self._last_flush > 0.5:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):  # closed stream at shutdown: dropping log lines beats crashing
            pass


class _Metrics:
    """Prometheus counters per model and endpoint, children bound once so the hot path is two calls."""

    def __init__(self, models: Mapping[str, ModelRuntime]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)   # CPU seconds, memory, open files: read only when scraped
        self.requests = Counter("bnfold_requests", "inference requests", ["model", "endpoint"],
                                registry=self.registry)
        self.errors = Counter("bnfold_errors", "inference requests answered with an error",
                              ["model", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("bnfold_request_latency_seconds", "time from request to response, server side",
                                 ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.bound: dict[tuple[str, str], tuple[Any, Any]] = {}
        for name in list(models) + ["-"]:
            for endpoint in ("infer", "predictions"):
                self.bound[(name, endpoint)] = (self.requests.labels(name, endpoint),
                                                self.latency.labels(name, endpoint))

    def observe(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        requests, latency = self.bound[(model, endpoint)]
        requests.inc()
        latency.observe(seconds)
        if status >= 400:
            self.errors.labels(model, endpoint, str(status)).inc()


class InferenceApp:
    """ASGI application serving `models` (name -> ModelRuntime).

    The names in `models` are the ones in URLs; parsers, encoders and metrics are kept under them.
    """

    def __init__(self, models: Mapping[str, ModelRuntime], *, max_body_bytes: int = 16 << 20,
                 access_log: AccessLog | None = None) -> None:
        if not models:
            raise ServeError("no models to serve", status=500)
        self.models = dict(models)
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log if access_log is not None else AccessLog()
        self.metrics = _Metrics(self.models)
        self.parsers = {name: RequestParser(m) for name, m in self.models.items()}
        self.encoders = {name: ResponseEncoder(m) for name, m in self.models.items()}
        self.ready = True
        self._flusher: asyncio.Task | None = None
        # Constant answers are encoded once.
        self._server_meta = json.dumps({"name": SERVER_NAME, "version": SERVER_VERSION,
                                        "extensions": EXTENSIONS}).encode()
        self._model_meta = {name: json.dumps(self._metadata(m)).encode() for name, m in self.models.items()}
        self._model_config = {name: json.dumps(self._config(m)).encode() for name, m in self.models.items()}
        self._index = json.dumps([{"name": n, "version": m.version, "state": "READY"}
                                  for n, m in self.models.items()]).encode()
        document = openapi_document(self.models)
        self._openapi = json.dumps(document).encode()
        self._docs = docs_html(document).encode()

    # ------------------------------------------------------------------ metadata documents
    @staticmethod
    def _metadata(m: ModelRuntime) -> dict[str, Any]:
        return {"name": m.name, "versions": [m.version], "platform": m.platform,
                "inputs": [t.to_dict() for t in m.inputs], "outputs": [t.to_dict() for t in m.outputs],
                "parameters": {"device": m.device, "providers": m.providers,
                               "spec": m.spec.to_dict() if m.spec is not None else None}}

    @staticmethod
    def _config(m: ModelRuntime) -> dict[str, Any]:
        dynamic_batch = bool(m.inputs[0].shape) and m.inputs[0].shape[0] == -1
        def dims(t):  # Triton's config leaves the batch out when max_batch_size > 0
            return t.shape[1:] if dynamic_batch else t.shape
        return {"name": m.name, "platform": m.platform, "backend": "onnxruntime",
                "max_batch_size": 32 if dynamic_batch else 0,
                "input": [{"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": dims(t)} for t in m.inputs],
                "output": [{"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": dims(t)} for t in m.outputs],
                "instance_group": [{"kind": "KIND_GPU" if m.device == "cuda" else "KIND_CPU", "count": 1}]}

    # ------------------------------------------------------------------ ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())
                for m in self.models.values():
                    log.info("serving model %r version %s from %s on %s (providers %s, %d threads, "
                             "warm-up %.3f ms, %s)", m.name, m.version, m.path, m.device, m.providers,
                             m.threads, m.warmup_ms, "in the event loop" if m.inline else "in a worker thread")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.ready = False
                if self._flusher is not None:
                    self._flusher.cancel()
                self.access_log.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.access_log.flush()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        method = scope["method"]
        path = scope["path"]
        model_name = None
        endpoint = None
        headers = _JSON
        try:
            if path.startswith("/v2/models/"):
                model_name = path[len("/v2/models/"):].split("/", 1)[0]
                endpoint = "infer" if path.endswith("/infer") else None
                status, headers, body = await self._model_route(method, path, scope, receive)
            elif path.startswith("/predictions/"):
                endpoint = "predictions"
                model_name = path[len("/predictions/"):].rstrip("/")
                self._require(method, "POST", path, also="PUT")   # `curl -T file URL` sends PUT
                status, headers, body = await self._predict(self._model(model_name), scope, receive)
            else:
                status, headers, body = self._static_route(method, path)
        except ServeError as exc:
            status, headers, body = exc.status, _JSON, _error(str(exc))
            if exc.status == 405:
                headers = _JSON + [(b"allow", getattr(exc, "allow", "GET").encode())]
        except _Disconnected:
            return
        except Exception as exc:  # a bug or an onnxruntime failure: log it, answer without internals
            log.exception("unexpected error serving %s %s", method, path)
            status, headers, body = 500, _JSON, _error(f"internal error: {type(exc).__name__}: {exc}")
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        elapsed = time.perf_counter() - start
        if endpoint is not None:
            self.metrics.observe(model_name if model_name in self.models else "-", endpoint, status, elapsed)
        if self.access_log.enabled:
            self.access_log.write(method, path, status, elapsed * 1e3, scope.get("client"), model_name)

    # ------------------------------------------------------------------ routing helpers
    def _model(self, name: str) -> ModelRuntime:
        model = self.models.get(name)
        if model is None:
            raise ServeError(f"unknown model {name!r}; this server has {sorted(self.models)}", status=404)
        return model

    @staticmethod
    def _require(method: str, allowed: str, path: str, also: str | None = None) -> None:
        if method != allowed and method != also:
            allow = allowed if also is None else f"{allowed}, {also}"
            exc = ServeError(f"method {method} not allowed on {path}; use {allow}", status=405)
            exc.allow = allow  # type: ignore[attr-defined]
            raise exc

    def _static_route(self, method: str, path: str) -> tuple[int, list, bytes]:
        if path in ("/v2/health/live", "/v2/health/ready"):
            self._require(method, "GET", path)
            if path.endswith("ready") and not self.ready:
                return 503, _JSON, _error("server is shutting down")
            return 200, _JSON, b""
        if path in ("/v2", "/v2/"):
            self._require(method, "GET", path)
            return 200, _JSON, self._server_meta
        if path == "/v2/repository/index":
            return 200, _JSON, self._index
        if path == "/metrics":
            self._require(method, "GET", path)
            return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(self.metrics.registry)
        if path == "/openapi.json":
            self._require(method, "GET", path)
            return 200, _JSON, self._openapi
        if path in ("/docs", "/docs/", "/"):
            self._require(method, "GET", path)
            return 200, [(b"content-type", b"text/html; charset=utf-8")], self._docs
        raise ServeError(f"no route for {method} {path}; see /docs for the endpoints", status=404)

    async def _model_route(self, method: str, path: str, scope: Scope, receive: Receive):
        parts = path[len("/v2/models/"):].split("/")
        name, rest = parts[0], parts[1:]
        model = self._model(name)
        if len(rest) >= 2 and rest[0] == "versions":
            if rest[1] != model.version:
                raise ServeError(f"unknown version {rest[1]!r} for model {name!r}; available: [{model.version!r}]",
                                 status=404)
            rest = rest[2:]
        action = rest[0] if rest else ""
        if len(rest) > 1 or (len(rest) == 1 and action not in ("infer", "ready", "config", "stats", "")):
            raise ServeError(f"no route for {method} {path}; see /docs for the endpoints", status=404)
        if action == "infer":
            self._require(method, "POST", path)
            return await self._infer(name, model, scope, receive)
        self._require(method, "GET", path)
        if action == "ready":
            return 200, _JSON, b""
        if action == "config":
            return 200, _JSON, self._model_config[name]
        if action == "stats":
            return 200, _JSON, self._stats(name, model)
        return 200, _JSON, self._model_meta[name]

    def _stats(self, name: str, model: ModelRuntime) -> bytes:
        requests, _ = self.metrics.bound[(name, "infer")]
        return json.dumps({"model_stats": [{"name": model.name, "version": model.version,
                                            "inference_count": int(requests._value.get())}]}).encode()

    # ------------------------------------------------------------------ bodies
    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise ServeError(f"Content-Length must be an integer, got {value[:40]!r}")
                if declared > limit:
                    raise ServeError(f"request body of {declared} bytes is over the limit of {limit} bytes "
                                     f"(--max-body-mb)", status=413)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        body = message.get("body", b"")
        if not message.get("more_body", False):
            return body
        chunks = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ServeError(f"request body is over the limit of {limit} bytes (--max-body-mb)", status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _header(scope: Scope, name: bytes) -> bytes | None:
        for key, value in scope["headers"]:
            if key == name:
                return value
        return None

    async def _run(self, model: ModelRuntime, x: np.ndarray) -> list[np.ndarray]:
        if model.inline:
            return model.run_all(x)
        return await asyncio.get_running_loop().run_in_executor(None, model.run_all, x)

    async def _infer(self, name: str, model: ModelRuntime, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
        body = await self._read_body(scope, receive)
        encoding = self._header(scope, b"content-encoding")
        if encoding is not None:
            body = _decompress(body, encoding)
        header_length = parse_header_length(self._header(scope, b"inference-header-content-length"), len(body))
        request = self.parsers[name].parse(body, header_length)
        results = await self._run(model, request.array)
        payload, json_length = self.encoders[name].encode(request, results)
        if json_length is None:
            return 200, _JSON, payload
        return 200, [(b"content-type", _OCTET),
                     (b"inference-header-content-length", str(json_length).encode())], payload

    async def _predict(self, model: ModelRuntime, scope: Scope, receive: Receive) -> tuple[int, list, bytes]:
        spec = model.spec
        if spec is None:
            raise ServeError(f"model {model.name!r} has no bnfold spec in its metadata, so its preprocessing "
                             f"is unknown; send tensors to /v2/models/{model.name}/infer instead")
        if spec.task != "classification":
            raise ServeError(f"model {model.name!r} is a {spec.task} model; /predictions answers class "
                             f"labels for classification models only (use /v2/models/{model.name}/infer)")
        k = images.parse_top_k(scope.get("query_string", b""), max(1, len(spec.labels)))
        body = await self._read_body(scope, receive)
        content_type = self._header(scope, b"content-type")
        data = images.extract_upload(body, content_type.decode("latin-1") if content_type else None)
        x = images.preprocess(images.decode_image(data), spec).astype(model.input_dtype, copy=False)
        logits = (await self._run(model, x))[0]
        answer = {"model": model.name, "predictions": images.top_k(logits[0], spec.labels, k)}
        return 200, _JSON, json.dumps(answer).encode()


def _decompress(body: bytes, encoding: bytes) -> bytes:
    """tritonclient can gzip/deflate request bodies (request_compression_algorithm)."""
    import zlib
    kind = encoding.strip().lower()
    try:
        if kind == b"gzip":
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if kind == b"deflate":
            return zlib.decompress(body)
    except zlib.error as exc:
        raise ServeError(f"body declared Content-Encoding {kind.decode('latin-1')} but does not decompress: {exc}")
    if kind in (b"identity", b""):
        return body
    raise ServeError(f"unsupported Content-Encoding {kind.decode('latin-1')!r}; expected gzip, deflate or identity",
                     status=415)


def create_app(models: Mapping[str, ModelRuntime] | str | os.PathLike, *, device: str = "cpu",
               threads: int | None = None, cuda_graph: bool = False, name: str | None = None,
               max_body_mb: float = 16.0, access_log: bool | AccessLog = True) -> InferenceApp:
    """The ASGI app for already-loaded models, or for a model file / repository folder to load.

    Loading happens here, before the server binds its port, so that a start-up failure (missing
    file, CUDA absent) is a clear `ServeError` and not a half-started server.
    """
    if max_body_mb <= 0:  # checked before loading: a typo should not cost a model load and warm-up
        raise ServeError(f"--max-body-mb must be positive, got {max_body_mb}", status=500)
    if not isinstance(models, Mapping):
        models = load_repository(models, device, threads=threads, cuda_graph=cuda_graph, name=name)
    log_writer = access_log if isinstance(access_log, AccessLog) else AccessLog(enabled=bool(access_log))
    return InferenceApp(models, max_body_bytes=int(max_body_mb * (1 << 20)), access_log=log_writer)
