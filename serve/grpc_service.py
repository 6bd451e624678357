"""The Open Inference Protocol v2 over gRPC: `inference.GRPCInferenceService`, beside the HTTP app.

`bnfold serve --grpc-port N` starts a `grpc.aio` server on the HTTP server's event loop (the app's
lifespan starts and stops it), so both protocols share one process and everything in it: the
models and the same entry point that runs them (`InferenceApp.run_model`: inline for small batches,
a worker thread for large ones), the limits, the Prometheus metrics (label `protocol="grpc"`) and
the JSON-lines access log (method `GRPC`, the RPC's path, the HTTP status the same mistake gets).

The messages are the generated classes tritonclient ships (`tritonclient.grpc.service_pb2`,
`model_config_pb2`); nothing here encodes protobuf by hand. Requests are decoded by our own
deserializer so that a message over `--max-body-mb` or bytes that are not a message are refused
with a status and a message, not an INTERNAL error. Every client mistake is the `ServeError` the
HTTP path raises for it, with its text, mapped to a gRPC status: 400 INVALID_ARGUMENT, 404
NOT_FOUND, 413 RESOURCE_EXHAUSTED, 503 UNAVAILABLE. Methods this server does not have (shared
memory, model load/unload, streaming, trace and log settings) answer UNIMPLEMENTED.

Limits: a message is refused past `--max-body-mb` (grpc's own transport limit sits 1 MiB above,
refusing with its own RESOURCE_EXHAUSTED message); raw tensor bytes held at once count against
`--max-pending-mb` as HTTP bodies do; `--max-connections` bounds the RPCs in progress (grpc answers
RESOURCE_EXHAUSTED past it); `--max-batch-size` and every input check are HTTP's.
"""
from __future__ import annotations

import json
import logging
import math
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2 as pb

from bnfold.versions import __version__

from .errors import ServeError, client_text, limit_error
from .protocol import (OutputRequest, _bytes_tensor, check_classification, check_datatype, check_input_name,
                       check_shape, classify, output_named)
from .runtime import Runtime

if TYPE_CHECKING:
    from .app import InferenceApp

SERVICE = "inference.GRPCInferenceService"
_TRANSPORT_SLACK = 1 << 20   # grpc's own receive limit sits this far above --max-body-mb

log = logging.getLogger("bnfold.serve")

# The HTTP status of a ServeError -> the gRPC status of the same mistake.
_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC status for an HTTP status: 4xx are the client's (never INTERNAL), 5xx the server's."""
    code = _CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL


# The typed `contents` field that carries each datatype (Triton's table; FP16/BF16 only go raw).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
# The wider numpy type each typed field arrives in, before the range check down to the datatype.
_CARRIER = {"int_contents": np.int32, "int64_contents": np.int64, "uint_contents": np.uint32,
            "uint64_contents": np.uint64, "fp32_contents": np.float32, "fp64_contents": np.float64,
            "bool_contents": np.bool_}


class _Refused:
    """What the deserializer hands over instead of a message: the error to answer with."""

    __slots__ = ("error",)

    def __init__(self, error: ServeError) -> None:
        self.error = error


def _deserializer(message_class: Any, max_bytes: int) -> Callable[[bytes], Any]:
    """`message_class.FromString`, refusing (without raising inside grpc) oversized or malformed bytes."""
    parse = message_class.FromString
    name = message_class.DESCRIPTOR.name

    def decode(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Refused(limit_error(f"request body of {len(data)} bytes", f"{max_bytes} bytes", "--max-body-mb"))
        try:
            return parse(data)
        except DecodeError as exc:
            return _Refused(ServeError(f"malformed {name} message: {exc}"))
    return decode


_Plan = tuple[np.dtype, tuple[int, ...], int, list[OutputRequest]]
_MAX_PLANS = 256


def parse_model_infer(model: Runtime, request: pb.ModelInferRequest,
                      plans: dict[tuple[str, str, tuple[int, ...]], _Plan] | None = None
                      ) -> tuple[np.ndarray, list[OutputRequest]]:
    """The input array and the outputs to return for a ModelInfer request; `ServeError` (400) naming the mistake.

    The checks and their wording are the HTTP path's (`serve.protocol`); what only gRPC has
    (raw contents, typed contents) gets messages of the same shape. `plans` (one dict per model)
    remembers the checked (input name, datatype, shape) of raw-contents requests that ask for the
    default outputs, so that a client repeating one kind of request is checked once (at most
    `_MAX_PLANS` kinds are kept).
    """
    inputs = request.inputs
    raw = request.raw_input_contents
    key = None
    if plans is not None and len(inputs) == 1 and len(raw) == 1 and not request.outputs:
        tensor = inputs[0]
        key = (tensor.name, tensor.datatype, tuple(tensor.shape))
        plan = plans.get(key)
        if plan is not None and len(raw[0]) == plan[2] and not tensor.HasField("contents"):
            return np.frombuffer(raw[0], plan[0]).reshape(plan[1]), plan[3]
    if len(inputs) != 1:
        raise ServeError(f"model {model.name!r} expects 'inputs' to be a list of 1 tensor "
                         f"({model.inputs[0].name!r}), got {len(inputs)}")
    tensor = inputs[0]
    name = check_input_name(model, tensor.name)
    dtype = check_datatype(model, name, tensor.datatype)
    shape = check_shape(model, name, list(tensor.shape))
    count = math.prod(shape)
    typed = tensor.HasField("contents")
    if len(raw) > 1:
        raise ServeError(f"{len(raw)} raw_input_contents for model {model.name!r}, which takes 1 input")
    if raw and typed:
        raise ServeError(f"input {name!r} for model {model.name!r} has both raw_input_contents and typed "
                         f"contents; send one of them")
    if raw:
        data = raw[0]
        needed = count * dtype.itemsize
        if len(data) != needed:
            raise ServeError(f"unexpected size of raw_input_contents for input {name!r} for model {model.name!r}. "
                             f"Shape {list(shape)} of {model.inputs[0].datatype} needs {needed} bytes, "
                             f"got {len(data)}")
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
    elif typed:
        array = _typed_contents(model, name, tensor.contents, dtype, shape)
    else:
        raise ServeError(f"input {name!r} for model {model.name!r} has neither raw_input_contents nor contents")
    outputs = _requested_outputs(model, request.outputs)
    if key is not None and raw and len(plans) < _MAX_PLANS:
        plans[key] = (dtype, shape, array.nbytes, outputs)
    return array, outputs


def _typed_contents(model: Runtime, name: str, contents: pb.InferTensorContents, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray:
    datatype = model.inputs[0].datatype
    field = _CONTENTS_FIELD.get(datatype)
    present = [f.name for f, _ in contents.ListFields()]
    if field is None:
        raise ServeError(f"input {name!r} for model {model.name!r} is {datatype}, which has no typed contents "
                         f"field; send it as raw_input_contents")
    others = [f for f in present if f != field]
    if others:
        raise ServeError(f"input {name!r} for model {model.name!r} is {datatype}: its data goes in "
                         f"contents.{field}, got contents.{others[0]}")
    values = np.asarray(getattr(contents, field), dtype=_CARRIER[field])
    count = math.prod(shape)
    if values.size != count:
        raise ServeError(f"unexpected number of elements for input {name!r} for model {model.name!r}. "
                         f"Shape {list(shape)} needs {count}, got {values.size}")
    if dtype.kind in "iu" and values.dtype != dtype and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise ServeError(f"'data' of input {name!r} for model {model.name!r} holds a number too large for "
                             f"datatype {datatype}")
    return values.astype(dtype, copy=False).reshape(shape)


def _requested_outputs(model: Runtime, requested: Any) -> list[OutputRequest]:
    if not requested:
        return [OutputRequest(meta, True) for meta in model.outputs]
    by_name = {meta.name: meta for meta in model.outputs}
    chosen = []
    for item in requested:
        meta = output_named(model, by_name, item.name)
        classes = 0
        if "classification" in item.parameters:
            param = item.parameters["classification"]
            kind = param.WhichOneof("parameter_choice")
            classes = param.int64_param if kind == "int64_param" else (param.uint64_param if kind == "uint64_param"
                                                                         else -1)
            if classes < 0:
                got = f"{param.int64_param}" if kind == "int64_param" else f"a {kind}"
                raise ServeError(f"parameters.classification of output {item.name!r} must be a positive integer "
                                 f"(how many top classes to return), got {got}")
            check_classification(model, meta, classes)
        chosen.append(OutputRequest(meta, True, classes))
    return chosen


class GrpcService:
    """`inference.GRPCInferenceService` for the models of `app`, bound to `host:port` by `start()`.

    `start()` and `stop()` run on the event loop that serves HTTP (the app's lifespan calls them).
    """

    def __init__(self, app: InferenceApp, host: str = "127.0.0.1", port: int = 0, *,
                 max_concurrent_rpcs: int | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.server: grpc.aio.Server | None = None
        self.bound_port: int | None = None
        # HTTP's /config documents, read once into Triton's ModelConfig messages on request
        self._configs = {name: json.loads(app._model_config[name]) for name in app.models}
        self._plans: dict[str, dict] = {name: {} for name in app.models}   # parse_model_infer's, per model

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> int:
        """Bind and start serving; returns the port (the one the OS chose for port 0)."""
        limit = self.app.max_body_bytes
        options = [("grpc.max_receive_message_length", limit + _TRANSPORT_SLACK),
                   ("grpc.max_send_message_length", -1),
                   # grpc sets SO_REUSEPORT by default: a second server on a busy port would
                   # silently share it instead of failing.
                   ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        handlers = {name: grpc.unary_unary_rpc_method_handler(
                        self.wrap(name, method), request_deserializer=_deserializer(request_class, limit),
                        response_serializer=response_class.SerializeToString)
                    for name, (method, request_class, response_class) in self.methods().items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ServeError(f"cannot listen for gRPC on {address}: {exc}", status=500) from None
        if port == 0:   # older grpc releases answer 0 instead of raising
            raise ServeError(f"cannot listen for gRPC on {address}", status=500)
        await server.start()
        self.server, self.bound_port = server, port
        print(f"bnfold serve: gRPC ({SERVICE}) on {self.host}:{port}", file=sys.stderr, flush=True)
        return port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking RPCs; those in progress get `grace` seconds to finish."""
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None

    def methods(self) -> dict[str, tuple[Callable[[Any], Awaitable[Any]], Any, Any]]:
        """RPC name -> (handler, request class, response class): the service's table."""
        return {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        }

    def wrap(self, rpc: str, method: Callable[[Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        """The grpc handler for `method`: errors become statuses; metrics and access log as HTTP's."""
        app = self.app
        path = f"/{SERVICE}/{rpc}"
        infer = rpc == "ModelInfer"

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            status, code, message = 200, grpc.StatusCode.OK, ""
            model = getattr(request, "model_name", None)
            reserved = 0
            try:
                if type(request) is _Refused:
                    raise request.error
                if infer:
                    reserved = _reserve(app, sum(len(b) for b in request.raw_input_contents))
                response = await method(request)
            except ServeError as exc:
                status, code, message = exc.status, grpc_code(exc.status), client_text(str(exc))
            except Exception as exc:  # a bug or an onnxruntime failure: logged, answered without internals
                log.exception("unexpected error serving gRPC %s", rpc)
                status, code = 500, grpc.StatusCode.INTERNAL
                message = f"internal error ({type(exc).__name__}); see the server log"
            finally:
                if reserved:
                    app.release(reserved)
            elapsed = time.perf_counter() - start
            known = model if model in app.models else "-"
            if infer:
                app.metrics.observe(known, "infer", status, elapsed, protocol="grpc",
                                    code=None if status < 400 else code.name)
            if app.access_log.enabled:
                peer = context.peer()   # "ipv4:127.0.0.1:51234", "ipv6:[::1]:51234", "unix:..."
                host = peer.split(":", 1)[1].rsplit(":", 1)[0].strip("[]") if peer.count(":") >= 2 else peer
                app.access_log.write("GRPC", path, status, elapsed * 1e3, (host,),
                                     model if model in app.models else None)
            if code is not grpc.StatusCode.OK:
                await context.abort(code, message)
            return response
        return handle

    # ------------------------------------------------------------------ models
    def _model(self, name: str, version: str) -> Runtime:
        """The served model `name` (any version when `version` is empty), or the HTTP path's 404."""
        model = self.app.models.get(name)
        if model is None:
            raise ServeError(f"unknown model {name[:200]!r}; this server has {sorted(self.app.models)}", status=404)
        if version and version != str(model.version):
            raise ServeError(f"unknown version {version[:200]!r} for model {name!r}; available: "
                             f"[{str(model.version)!r}]", status=404)
        return model

    # ------------------------------------------------------------------ RPCs
    async def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.app.ready)

    async def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        self._model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.app.ready)

    async def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        from .app import EXTENSIONS, SERVER_NAME

        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        m = self._model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name, versions=[str(m.version)], platform=m.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in m.outputs])

    async def model_config(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        m = self._model(request.name, request.version)
        # The document HTTP's /config answers, read into Triton's ModelConfig message.
        config = json_format.ParseDict(self._configs[request.name], model_config_pb2.ModelConfig(),
                                       ignore_unknown_fields=True)
        config.name = m.name
        return pb.ModelConfigResponse(config=config)

    async def model_statistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        if request.name:
            self._model(request.name, request.version)   # the 404 for an unknown name or version
        names = [request.name] if request.name else list(self.app.models)
        stats = []
        for name in names:
            m = self.app.models[name]
            success, fail = self.app.metrics.outcomes[name]
            stats.append(pb.ModelStatistics(
                name=name, version=str(m.version), inference_count=success, execution_count=success,
                inference_stats=pb.InferStatistics(success=pb.StatisticDuration(count=success),
                                                   fail=pb.StatisticDuration(count=fail))))
        return pb.ModelStatisticsResponse(model_stats=stats)

    async def repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[entry(name=n, version=str(m.version), state="READY")
                                                  for n, m in self.app.models.items()])

    async def model_infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        array, outputs = parse_model_infer(model, request, self._plans[request.model_name])
        results = await self.app.run_model(model.name, array)   # the entry point HTTP's /infer uses
        by_name = dict(zip((o.name for o in model.outputs), results))
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        labels = model.spec.labels if model.spec is not None else None
        for out in outputs:
            array_out, datatype = by_name[out.meta.name], out.meta.datatype
            if out.classes:
                array_out, datatype = classify(array_out, out.classes, labels), "BYTES"
                data = _bytes_tensor(array_out)
            else:
                data = array_out.tobytes()
            response.outputs.add(name=out.meta.name, datatype=datatype, shape=array_out.shape)
            response.raw_output_contents.append(data)
        return response


class _Held:
    """What `InferenceApp.reserve` counts a request's bytes on (an HTTP `Request` elsewhere)."""

    __slots__ = ("reserved",)

    def __init__(self) -> None:
        self.reserved = 0


def _reserve(app: InferenceApp, size: int) -> int:
    """Count `size` tensor bytes against --max-pending-mb as HTTP counts bodies (503 past it); the size held."""
    held = _Held()
    app.reserve(held, size)
    return held.reserved


def check_port_free(host: str, port: int) -> None:
    """Refuse a busy gRPC port before anything starts (grpc itself would only say so in the lifespan)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen for gRPC on {host}:{port}: {exc.strerror or exc}", status=500) from None


def attach_grpc(app: InferenceApp, host: str, port: int, *, max_concurrent_rpcs: int | None = None) -> GrpcService:
    """Serve `app`'s models over gRPC too: started and stopped with the app's lifespan."""
    check_port_free(host, port)
    service = GrpcService(app, host, port, max_concurrent_rpcs=max_concurrent_rpcs)
    app.startup_hooks.append(service.start)
    app.shutdown_hooks.append(service.stop)
    return service


__all__ = ["GrpcService", "SERVICE", "attach_grpc", "grpc_code", "parse_model_infer"]
