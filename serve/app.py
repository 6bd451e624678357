"""The HTTP service: a plain ASGI callable speaking the Open Inference Protocol v2.

No framework sits on the hot path: `ROUTES` (at the end of this file) is compiled once at
start-up into a dictionary from concrete paths to handlers (`serve.routes.Router`), binary
tensors are `numpy.frombuffer` views of the body, constant response parts are encoded once,
and a request whose batch the model answers in under `INLINE_THRESHOLD_MS` runs right in the
event loop (a thread hop would cost more than the model); larger batches and slower models go to
a worker thread, and decompression and image decoding to a pool of their own under the byte and
pixel budgets (`--max-pending-mb`, `--max-decode-mpx`; serve.decoding), so the server stays responsive.

The OpenAPI document (`/openapi.json`, `/docs`) is generated from the same table. Every client
mistake is a 4xx with `{"error": "..."}`; an unexpected failure is a 500 naming the exception's
type only (the details go to the log), never a traceback.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Awaitable, Callable, TextIO

import numpy as np
import orjson
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)

from bnfold.models.spec import triton_model_config
from bnfold.serve import images
from bnfold.serve.config import ServeConfig
from bnfold.serve.decoding import PixelBudget, decode_pool
from bnfold.serve.errors import ServeError, client_text, limit_error
from bnfold.serve.openapi import DOCS_HEADERS, PREDICTIONS_DOC, docs_html, infer_doc, ok, openapi_document
from bnfold.serve.page import PageAssets
from bnfold.serve.protocol import RequestParser, ResponseEncoder, parse_header_length
from bnfold.serve.repository import load_models
from bnfold.serve.routes import Receive, Request, Response, Route, Router, Scope, Send
from bnfold.serve.runtime import V2_TO_NUMPY, Runtime, available_cpus
from bnfold.serve.scheduler import RunObserver, Scheduler, Scheduling, build_scheduler
from bnfold.versions import __version__


SERVER_NAME = "bnfold"
# Only what exists: no model_repository (load/unload) extension here.
EXTENSIONS = ["binary_tensor_data", "classification", "statistics"]

log = logging.getLogger("bnfold.serve")

_JSON = [(b"content-type", b"application/json")]
_OCTET = b"application/octet-stream"
# Of a runtime's details(), what the model metadata document shows clients.
_CLIENT_DETAILS = ("metadata",)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 10.0)


class _Disconnected(Exception):
    """The client went away before the body arrived; nothing to answer."""


def _error(message: str) -> bytes:
    return json.dumps({"error": client_text(message)}).encode()


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
                           f'"path":{json.dumps(path[:1000])},"status":{status},"ms":{ms:.3f}{model_part}}}\n')
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
    """Prometheus counters per model, endpoint and protocol, children bound once so the hot path is two calls.

    `outcomes[model]` counts successful and failed inference requests apart (HTTP and gRPC
    together), for `/stats` and gRPC's ModelStatistics.
    """

    def __init__(self, models: Mapping[str, Runtime], routes: Sequence[Route]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)   # CPU seconds, memory, open files: read only when scraped
        labels = ["model", "endpoint", "protocol"]
        self.requests = Counter("bnfold_requests", "inference requests", labels, registry=self.registry)
        self.errors = Counter("bnfold_errors", "inference requests answered with an error (status: the HTTP "
                              "status, or the gRPC status name)", labels + ["status"], registry=self.registry)
        self.latency = Histogram("bnfold_request_latency_seconds", "time from request to response, server side",
                                 labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.bound: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.outcomes: dict[str, list[int]] = {name: [0, 0] for name in models}   # [success, fail]
        # Per onnxruntime run (serve.scheduler): with dynamic batching one run answers several requests.
        self.batch_size = Histogram("bnfold_batch_size", "rows (batch size) of each model run; with dynamic "
                                    "batching one run serves several requests", ["model"], buckets=_BATCH_BUCKETS,
                                    registry=self.registry)
        self.queue_wait = Histogram("bnfold_queue_seconds", "time a request waited for its model run to start "
                                    "(dynamic batching delay, or a busy instance)", ["model"],
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        # The labels come from the route table (every route with an `endpoint`), so that a new counted
        # route needs no second entry here; gRPC counts its ModelInfer calls as "infer".
        http = tuple(dict.fromkeys(r.endpoint for r in routes if r.endpoint is not None))
        for protocol, endpoints in (("http", http), ("grpc", ("infer",))):
            for name in list(models) + ["-"]:
                for endpoint in endpoints:
                    self.bound[(name, endpoint, protocol)] = (self.requests.labels(name, endpoint, protocol),
                                                              self.latency.labels(name, endpoint, protocol))

    def run_observer(self, model: str) -> RunObserver:
        """The scheduler's callback for `model`: rows per run and each request's wait for its run."""
        rows = self.batch_size.labels(model)
        waits = self.queue_wait.labels(model)

        def observe(batch: int, waited: Any, seconds: float) -> None:
            rows.observe(batch)
            for wait in waited:
                waits.observe(wait)
        return observe

    def observe(self, model: str, endpoint: str, status: int, seconds: float, protocol: str = "http",
                code: str | None = None) -> None:
        """One request; `status` is HTTP's (or the HTTP status of a gRPC error), `code` a gRPC status name."""
        requests, latency = self.bound[(model, endpoint, protocol)]
        requests.inc()
        latency.observe(seconds)
        if status >= 400:
            self.errors.labels(model, endpoint, protocol, code or str(status)).inc()
        if endpoint == "infer" and model in self.outcomes:
            self.outcomes[model][status >= 400] += 1


class InferenceApp:
    """ASGI application serving `models` (name -> Runtime) through the route table `routes`.

    The names in `models` are the ones in URLs; parsers, encoders and metrics are kept under them.
    """

    def __init__(self, models: Mapping[str, Runtime], *, max_body_bytes: int = 16 << 20,
                 max_multipart_parts: int = 16, max_pending_bytes: int = 128 << 20,
                 max_decode_pixels: int = 48_000_000, decode_wait: float = 30.0, decode_workers: int = 2,
                 access_log: AccessLog | None = None, routes: list[Route] | None = None,
                 strict_images: bool = False) -> None:
        if not models:
            raise ServeError("no models to serve", status=500)
        self.models = dict(models)
        self.max_body_bytes = max_body_bytes
        self.max_multipart_parts = max_multipart_parts
        self.strict_images = strict_images   # refuse uploads far from the model's input (images.describe_image)
        # Bodies held by requests in progress, all connections together: without a bound, 512
        # connections each sending 16 MB held 8 GB (40 held 600 MB, and glibc kept it afterwards).
        # The default, 128 MB, is also what the loop can get through at once: 17 bodies of 15 MB
        # finishing together (256 MB) kept a health check waiting 1.2 s, at ~65 ms of loop each.
        # Counted as bytes arrive and as they are inflated, never from a Content-Length: eight
        # idle connections declaring 16 MB each once locked every other client out.
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0
        self._pending_lock = threading.Lock()   # inflating takes its share from a decoding thread
        # Decoded images: pixels held at once, and their own threads (serve.decoding).
        self.pixels = PixelBudget(max_decode_pixels, decode_wait)
        self.decode_pool = decode_pool(decode_workers)
        self.access_log = access_log if access_log is not None else AccessLog()
        self.metrics = _Metrics(self.models, ROUTES if routes is None else routes)
        self.parsers = {name: RequestParser(m) for name, m in self.models.items()}
        self.encoders = {name: ResponseEncoder(m) for name, m in self.models.items()}
        # Every inference, HTTP or gRPC, runs through its model's scheduler (serve.scheduler).
        self.schedulers: dict[str, Scheduler] = {
            name: build_scheduler(m, getattr(m, "scheduling", Scheduling()), self.metrics.run_observer(name))
            for name, m in self.models.items()}
        self.ready = True
        self._flusher: asyncio.Task | None = None
        # Servers that share this app's loop and lifespan (serve.grpc_service): awaited at start-up, in
        # order, and at shutdown after HTTP has stopped taking requests.
        self.startup_hooks: list[Callable[[], Awaitable[Any]]] = []
        self.shutdown_hooks: list[Callable[[], Awaitable[Any]]] = []
        self.routes = list(ROUTES if routes is None else routes)
        self.router = Router(self.routes, self.models)
        # Constant answers are encoded once.
        self._server_meta = json.dumps({"name": SERVER_NAME, "version": __version__,
                                        "extensions": EXTENSIONS}).encode()
        self._model_meta = {name: json.dumps(self._metadata(m)).encode() for name, m in self.models.items()}
        self._model_config = {name: json.dumps(self._config(m)).encode() for name, m in self.models.items()}
        self._index = json.dumps([{"name": n, "version": m.version, "state": "READY"}
                                  for n, m in self.models.items()]).encode()
        self.openapi = openapi_document(self.routes, self.models)
        self._openapi = json.dumps(self.openapi).encode()
        self._docs = docs_html(self.openapi).encode()
        self._page = PageAssets()   # GET / and /static/*: the page for people (serve.page)

    # ------------------------------------------------------------------ metadata documents
    @staticmethod
    def _metadata(m: Runtime) -> dict[str, Any]:
        # What a client needs to call the model, and the model file's own metadata (fold summary,
        # parity; the page's cards show it); nothing of the host: the file's path, thread count and
        # providers are in the start-up log only.
        details = m.details()
        return {"name": m.name, "versions": [m.version], "platform": m.platform,
                "inputs": [t.to_dict() for t in m.inputs], "outputs": [t.to_dict() for t in m.outputs],
                "parameters": {"device": m.device, "max_batch_size": m.max_batch_size,
                               "spec": m.spec.to_dict() if m.spec is not None else None,
                               **{k: details[k] for k in _CLIENT_DETAILS if k in details}}}

    @staticmethod
    def _config(m: Runtime) -> dict[str, Any]:
        # The same fields export.triton writes into config.pbtxt, from the one builder.
        config = triton_model_config(m.name, [(t.name, t.datatype, t.shape) for t in m.inputs],
                                     [(t.name, t.datatype, t.shape) for t in m.outputs],
                                     max_batch_size=m.max_batch_size, device=m.device)
        scheduling = getattr(m, "scheduling", Scheduling())   # what serve.scheduler follows for this model
        config["instance_group"] = [{**group, "count": scheduling.instances} for group in config["instance_group"]]
        if scheduling.batching:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": scheduling.max_queue_delay_us,
                                          "preferred_batch_size": list(scheduling.preferred_batch_sizes)}
        return {**config, "platform": m.platform, "backend": "onnxruntime"}

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
                    details = m.details()
                    log.info("serving model %r version %s from %s on %s (%s; max batch %s; batches up to %d "
                             "run in the event loop, larger ones in a worker thread)", m.name, m.version,
                             details.get("path", "?"), m.device,
                             ", ".join(f"{k} {v}" for k, v in details.items() if k not in ("path", "metadata")),
                             m.max_batch_size or "fixed", m.inline_batch)
                for name, scheduler in self.schedulers.items():
                    log.info("model %r runs on %s", name, scheduler.scheduling.describe())
                try:
                    for hook in self.startup_hooks:
                        await hook()
                except ServeError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.ready = False
                for hook in self.shutdown_hooks:
                    await hook()
                for scheduler in self.schedulers.values():
                    await asyncio.get_running_loop().run_in_executor(None, scheduler.close)
                if self._flusher is not None:
                    self._flusher.cancel()
                self.access_log.flush()
                self.decode_pool.shutdown(wait=False)
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
        route = None
        model_name = None
        request = None
        try:
            if b"%" in scope.get("raw_path", b"") and b"%2f" in scope["raw_path"].lower():
                # uvicorn decodes %2F into the path, where it would read as a separator. No name here
                # holds a '/' (models, versions, static files), so such a path names nothing.
                raise ServeError(f"no route for {method} {scope['raw_path'][:200].decode('latin-1')}: an "
                                 f"encoded '/' (%2F) is not a path separator, and no name here contains one",
                                 status=404)
            route, params = self.router.match(method, path)
            model_name = params.get("model")
            request = Request(method, path, scope, receive, params)
            status, headers, body = await route.handler(self, request)
        except ServeError as exc:
            status, headers, body = exc.status, _JSON, _error(str(exc))
            if exc.allow is not None:
                headers = _JSON + [(b"allow", exc.allow.encode())]
        except _Disconnected:
            return
        except Exception as exc:  # a bug or an onnxruntime failure: log it, answer without internals
            log.exception("unexpected error serving %s %s", method, path[:200])
            status, headers, body = 500, _JSON, _error(f"internal error ({type(exc).__name__}); see the server log")
        finally:
            if request is not None and request.reserved:
                self.release(request.reserved)   # the handler is done with its body
        await send({"type": "http.response.start", "status": status,   # a 304 has no length of its own
                    "headers": headers + [(b"content-length", str(len(body)).encode())] if status != 304 else headers})
        await send({"type": "http.response.body", "body": body})
        elapsed = time.perf_counter() - start
        if route is not None and route.endpoint is not None:
            self.metrics.observe(model_name if model_name in self.models else "-", route.endpoint, status, elapsed)
        if self.access_log.enabled:
            self.access_log.write(method, path, status, elapsed * 1e3, scope.get("client"), model_name)

    # ------------------------------------------------------------------ handlers (see ROUTES)
    # The status is the answer (OIP v2); the JSON body is for KServe's REST client, which reads
    # "live"/"ready" from it (and fails on an empty body), as KServe's own ModelServer answers.
    async def live(self, request: Request) -> Response:
        return 200, _JSON, b'{"live":true}'

    async def ready_(self, request: Request) -> Response:
        if not self.ready:
            return 503, _JSON, _error("server is shutting down")
        return 200, _JSON, b'{"ready":true}'

    async def server_metadata(self, request: Request) -> Response:
        return 200, _JSON, self._server_meta

    async def repository_index(self, request: Request) -> Response:
        return 200, _JSON, self._index

    async def model_metadata(self, request: Request) -> Response:
        return 200, _JSON, self._model_meta[request.model]

    async def model_ready(self, request: Request) -> Response:
        return 200, _JSON, b""

    async def model_config(self, request: Request) -> Response:
        return 200, _JSON, self._model_config[request.model]

    async def model_stats(self, request: Request) -> Response:
        model = self.models[request.model]
        success, fail = self.metrics.outcomes[request.model]
        return 200, _JSON, orjson.dumps({"model_stats": [{
            "name": model.name, "version": model.version, "inference_count": success,
            "execution_count": success,
            "inference_stats": {"success": {"count": success}, "fail": {"count": fail}}}]})

    async def metrics_text(self, request: Request) -> Response:
        return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(self.metrics.registry)

    async def openapi_json(self, request: Request) -> Response:
        return 200, _JSON, self._openapi

    async def docs_page(self, request: Request) -> Response:
        return 200, DOCS_HEADERS, self._docs

    async def page_index(self, request: Request) -> Response:
        return self._page.index(request.header(b"if-none-match"))

    async def page_static(self, request: Request) -> Response:
        return self._page.get(request.params["file"], request.header(b"if-none-match"))

    async def infer(self, request: Request) -> Response:
        name = request.model
        model = self.models[name]
        body = await self._read_body(request)
        encoding = request.header(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            # Inflating is CPU work proportional to the output (up to the body limit): off the loop,
            # its output counted against --max-pending-mb as it grows.
            body = await asyncio.get_running_loop().run_in_executor(
                self.decode_pool, inflate, body, encoding, self.max_body_bytes,
                lambda size: self.reserve(request, size))
        header_length = parse_header_length(request.header(b"inference-header-content-length"), len(body))
        parsed = self.parsers[name].parse(body, header_length)
        results = await self.run_model(name, parsed.array)
        payload, json_length = self.encoders[name].encode(parsed, results)
        if json_length is None:
            return 200, _JSON, payload
        return 200, [(b"content-type", _OCTET),
                     (b"inference-header-content-length", str(json_length).encode())], payload

    async def predict(self, request: Request) -> Response:
        model = self.models[request.model]
        spec = model.spec
        if spec is None:
            raise ServeError(f"model {model.name!r} has no bnfold spec in its metadata, so its preprocessing "
                             f"is unknown; send tensors to /v2/models/{model.name}/infer instead")
        if spec.task != "classification":
            raise ServeError(f"model {model.name!r} is a {spec.task} model; /predictions answers class "
                             f"labels for classification models only (use /v2/models/{model.name}/infer)")
        start = time.perf_counter()
        k = images.parse_top_k(request.scope.get("query_string", b""), max(1, len(spec.labels)))
        body = await self._read_body(request)
        content_type = request.header(b"content-type")
        # Multipart splitting, image decoding and preprocessing are blocking: the decoding threads do
        # them, the header first, then the pixels once the budget has room for them (serve.decoding).
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self.decode_pool, images.open_upload, body,
                                           content_type.decode("latin-1") if content_type else None,
                                           self.max_multipart_parts)
        note = images.describe_image(image, spec)   # from the header: say what preprocessing does to it
        if self.strict_images:
            images.refuse_far_image(note)
        async with self.pixels.hold(image.width * image.height):
            x = await loop.run_in_executor(self.decode_pool, images.upload_to_input, image, spec,
                                           V2_TO_NUMPY[model.inputs[0].datatype])
        del image
        model_start = time.perf_counter()
        logits = (await self.run_model(model.name, x))[0]
        model_ms = (time.perf_counter() - model_start) * 1e3
        answer = json.dumps({"model": model.name, "predictions": images.top_k(logits[0], spec.labels, k),
                             "image": note.to_dict()}).encode()
        # Server-side latency in the standard header (the page shows it; browsers' devtools too):
        # total = body read, decode, preprocess, model and top-k; model = the onnxruntime call.
        timing = f"total;dur={(time.perf_counter() - start) * 1e3:.3f}, model;dur={model_ms:.3f}"
        headers = [(b"server-timing", timing.encode()), (b"bnfold-image", note.header().encode("latin-1", "replace"))]
        if note.warning is not None:
            headers.append((b"bnfold-image-warning", note.warning.encode("latin-1", "replace")))
        return 200, _JSON + headers, answer

    # ------------------------------------------------------------------ helpers
    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.header(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise ServeError(f"Content-Length must be an integer, got {declared[:40]!r}")
            if size > limit:
                raise limit_error(f"request body of {size} bytes", f"{limit} bytes", "--max-body-mb")
        # What arrives is counted against --max-pending-mb, not what Content-Length promises: until
        # the handler reads, uvicorn holds at most 64 KB of a body and stops reading the socket.
        receive = request.receive
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        body = message.get("body", b"")
        self.reserve(request, len(body))
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
                raise limit_error("request body", f"{limit} bytes", "--max-body-mb")
            self.reserve(request, len(chunk))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def reserve(self, request: Request, size: int) -> None:
        """Count `size` body bytes against --max-pending-mb (503 past it); _http gives them back.

        Called on the event loop for received bytes and from a decoding thread for inflated ones.
        """
        with self._pending_lock:
            if self.pending_bytes + size > self.max_pending_bytes:
                held = self.pending_bytes
            else:
                self.pending_bytes += size
                request.reserved += size
                return
        raise limit_error(f"request bodies held at once ({held} bytes, and {size} more for this one)",
                          f"{self.max_pending_bytes} bytes", "--max-pending-mb", status=503)

    def release(self, size: int) -> None:
        """Give back `size` bytes that `reserve` counted (HTTP bodies, gRPC tensors)."""
        with self._pending_lock:
            self.pending_bytes -= size

    async def run_model(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        """Model `name`'s outputs for `x` through its scheduler: the one entry point HTTP and gRPC use."""
        return await self.schedulers[name].infer(x)


# Concatenated gzip members are one body (RFC 1952; `gzip.decompress` and gunzip agree); each
# costs a fresh inflater, so their number is bounded. The body is fed in pieces so that what zlib
# copies out as `unused_data` at a member's end is at most one piece.
_MAX_GZIP_MEMBERS = 1000
_FEED_BYTES = 64 * 1024


def inflate(body: bytes, encoding: bytes, limit: int, hold: Callable[[int], None] | None = None) -> bytes:
    """A gzip/deflate body (tritonclient's request_compression_algorithm), inflated to at most `limit` bytes.

    zlib stops at `limit + 1` bytes of output in all, so a bomb costs at most that much memory and
    time before it is refused. A gzip body may hold several members (their contents are joined);
    bytes after a deflate stream, or after a member that are not another member, are refused.
    `hold(n)` is told of each piece of output before it is kept (the app's pending-bytes budget,
    which raises when full).
    """
    kind = encoding.strip().lower()
    if kind == b"gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif kind == b"deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise ServeError(f"unsupported Content-Encoding {kind.decode('latin-1')[:40]!r}; expected gzip, deflate "
                         f"or identity", status=415)
    name = kind.decode("latin-1")
    view = memoryview(body)
    inflater = zlib.decompressobj(wbits)
    pieces: list[bytes] = []
    size = pos = 0
    members = 1
    while True:
        piece = view[pos:pos + _FEED_BYTES]
        pos += len(piece)
        try:
            out = inflater.decompress(piece, limit + 1 - size)   # never 0 (= unbounded): size <= limit here
        except zlib.error as exc:
            raise ServeError(f"body declared Content-Encoding {name} but does not decompress: {exc}")
        size += len(out)
        if size > limit:
            raise limit_error(f"request body inflated from {len(body)} bytes ({name})", f"{limit} bytes",
                              "--max-body-mb")
        if hold is not None:
            hold(len(out))
        pieces.append(out)
        if inflater.eof:
            pos -= len(inflater.unused_data)   # fed, but after this stream's end
            if pos == len(view):
                return b"".join(pieces)
            if kind != b"gzip":
                raise ServeError(f"body declared Content-Encoding deflate but {len(view) - pos} bytes follow "
                                 f"the end of its stream")
            members += 1
            if members > _MAX_GZIP_MEMBERS:
                raise ServeError(f"gzip body of more than {_MAX_GZIP_MEMBERS} members; send one member")
            inflater = zlib.decompressobj(wbits)
        elif pos >= len(view):
            raise ServeError(f"body declared Content-Encoding {name} but its stream is truncated")


def create_app(config: ServeConfig, models: Mapping[str, Runtime] | None = None) -> InferenceApp:
    """The ASGI app for `config`: its models loaded (unless given), its limits set.

    Loading happens here, before the server binds its port, so that a start-up failure (missing
    file, CUDA absent, a bad config.pbtxt) is a clear `ServeError` and not a half-started server.
    """
    if models is None:
        models = load_models(config.model, config.device, threads=config.threads,
                                 cuda_graph=config.cuda_graph, name=config.name,
                                 max_batch_size=config.max_batch_size, instances=config.instances,
                                 dynamic_batching=config.dynamic_batching)
    if config.spec is not None:
        _give_spec(models, config.spec)
    access = config.access_log and config.log_level in ("debug", "info")
    return InferenceApp(models, max_body_bytes=config.max_body_bytes,
                        max_multipart_parts=config.max_multipart_parts,
                        max_pending_bytes=config.max_pending_bytes,
                        max_decode_pixels=config.max_decode_pixels,
                        decode_workers=max(2, min(4, available_cpus())), access_log=AccessLog(enabled=access),
                        strict_images=config.strict_images)


def _give_spec(models: Mapping[str, Runtime], path: str | os.PathLike) -> None:
    """`--spec FILE`: the one served model gets the spec its file lacks (checked against its input)."""
    from bnfold.models.spec_options import SpecError, read_spec_file

    if len(models) != 1:
        raise ServeError(f"--spec applies to a single model file, and {len(models)} models were given "
                         f"({', '.join(sorted(models))}): serve that file alone with --spec, or give it a "
                         "spec with `bnfold export FILE --out DIR` (--labels, --mean, --std)", status=500)
    try:
        spec = read_spec_file(path)
    except SpecError as exc:
        raise ServeError(str(exc), status=500) from None
    runtime = next(iter(models.values()))
    expected = list(runtime.inputs[0].shape[1:])
    if len(expected) != len(spec.input_shape) or any(e not in (-1, g) for e, g in zip(expected, spec.input_shape)):
        raise ServeError(f"--spec {str(path)!r} says input_shape {spec.input_shape}, but model "
                         f"{runtime.name!r} takes {runtime.inputs[0].shape} (batch first)", status=500)
    # A label list of the wrong length would silently name the wrong classes (or drop some), as
    # `export --labels` and `fold-onnx --labels` refuse it too.
    scores = runtime.outputs[0].shape if runtime.outputs else []
    if (spec.task == "classification" and spec.labels and len(scores) == 2 and scores[1] > 0
            and len(spec.labels) != scores[1]):
        raise ServeError(f"--spec {str(path)!r} names {len(spec.labels)} labels, but model {runtime.name!r} "
                         f"outputs {scores[1]} scores (output {runtime.outputs[0].name!r}, shape {scores})", status=500)
    runtime.spec = spec  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The route table. One line per route; the OpenAPI document is generated from it. A route under
# /v2/models/{model} is also under /v2/models/{model}/versions/{version} (Triton's paths).
_GET, _POST = ("GET",), ("POST",)
_M, _MV = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"

ROUTES: list[Route] = [
    Route(_GET, "/v2/health/live", InferenceApp.live, "The process answers", {"responses": {"200": ok("live")}}),
    Route(_GET, "/v2/health/ready", InferenceApp.ready_, "Every model is loaded and warmed up",
          {"responses": {"200": ok("ready"), "503": ok("shutting down")}}),
    Route(_GET, "/v2", InferenceApp.server_metadata, "Server metadata: name, version, extensions"),
    Route(("GET", "POST"), "/v2/repository/index", InferenceApp.repository_index,
          "The served models, each with its version and state (Triton clients POST here)"),
    Route(_GET, _M, InferenceApp.model_metadata, "Model metadata: inputs and outputs with datatype and shape "
          "(-1 is a dynamic dimension), the spec, the device"),
    Route(_GET, _MV, InferenceApp.model_metadata, "Model metadata for one version"),
    Route(_GET, _M + "/ready", InferenceApp.model_ready, "Model readiness"),
    Route(_GET, _MV + "/ready", InferenceApp.model_ready, "Model readiness, one version"),
    Route(_GET, _M + "/config", InferenceApp.model_config, "Triton-style model configuration (max_batch_size: "
          "the largest batch a request may carry)"),
    Route(_GET, _MV + "/config", InferenceApp.model_config, "Triton-style model configuration, one version"),
    Route(_GET, _M + "/stats", InferenceApp.model_stats, "Inference statistics: successful and failed requests"),
    Route(_GET, _MV + "/stats", InferenceApp.model_stats, "Inference statistics, one version"),
    Route(_POST, _M + "/infer", InferenceApp.infer, "Run the model on tensors (JSON, or JSON header + binary "
          "tensor data)", infer_doc, endpoint="infer"),
    Route(_POST, _MV + "/infer", InferenceApp.infer, "Run one version of the model on tensors", infer_doc,
          endpoint="infer"),
    # PUT too: `curl -T file URL` sends PUT.
    Route(("POST", "PUT"), "/predictions/{model}", InferenceApp.predict, "Classify an image file (PNG or JPEG; "
          "raw body or multipart/form-data)", PREDICTIONS_DOC, endpoint="predictions"),
    Route(_GET, "/metrics", InferenceApp.metrics_text, "Prometheus metrics: requests, errors and latency per model",
          {"responses": {"200": ok("text exposition", {"type": "string"}, "text/plain")}}),
    Route(_GET, "/openapi.json", InferenceApp.openapi_json, "This document", {"responses": {"200": ok("OpenAPI 3.1")}}),
    Route(_GET, "/docs", InferenceApp.docs_page, "This API as a readable page", {"responses": {"200": ok("HTML")}}),
    Route(_GET, "/", InferenceApp.page_index, "A page for people: a card per model, an image picker and a drawing "
          "pad, answered by /predictions", {"responses": {"200": ok("HTML")}}),
    Route(_GET, "/static/{file}", InferenceApp.page_static, "The page's script and style sheet (index.html, "
          "page.js, page.css)", {"responses": {"200": ok("the file"), "404": ok("no such file")}}),
]
