"""The load generator's gRPC side: Open Inference Protocol `ModelInfer` calls over `grpc.aio`.

Like the HTTP generator (`bench.loadtest`): each of `concurrency` connections sends its share of
the requests back to back, each timed from the call to its answer; requests are serialized once
(the channel sends bytes and hands back bytes, so no protobuf work is timed on the client); an
answer counts as an error unless it is OK and byte for byte the first answer to the same input.
Each connection is a channel of its own with a local subchannel pool, so that eight
"connections" are eight TCP connections and not eight streams on one.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from bnfold.serve.errors import ServeError

from .loadtest import LoadtestResult, _run, _Tally, request_inputs

_INFER = "/inference.GRPCInferenceService/ModelInfer"


def grpc_target(url: str) -> str:
    """"host:port" from "grpc://host:port" or "host:port" (what `bnfold serve --grpc-port` prints)."""
    target = url.removeprefix("grpc://").rstrip("/")
    host, _, port = target.rpartition(":")
    if "://" in target or not host or not port.isdigit():
        raise ServeError(f"expected a gRPC address like 127.0.0.1:8001 or grpc://127.0.0.1:8001, got {url!r}")
    return target


def fetch_grpc_metadata(target: str, model: str,
                        metadata: tuple[tuple[str, str], ...] = ()) -> tuple[str, str, list[int]]:
    """(input name, datatype, shape) of `model`'s first input, from the server's ModelMetadata."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            meta = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                pb.ModelMetadataRequest(name=model), timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            raise ServeError(f"gRPC server {target} answered {exc.code().name} for model {model!r}: "
                             f"{exc.details()}") from None
    first = meta.inputs[0]
    return first.name, first.datatype, list(first.shape)


def infer_request(model: str, input_name: str, datatype: str, x: np.ndarray) -> bytes:
    """A serialized ModelInferRequest carrying `x` as raw_input_contents."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype=datatype, shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    return request.SerializeToString()


async def _drive(target: str, requests: list[bytes], concurrency: int, total: int,
                 warmup: int, metadata: tuple[tuple[str, str], ...] = ()) -> tuple[_Tally, float, float]:
    import grpc

    tally = _Tally()
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                           ("grpc.max_receive_message_length", -1)])
                for _ in range(concurrency)]
    calls = [channel.unary_unary(_INFER) for channel in channels]   # bytes in, bytes out

    async def run(c: int, count: int, offset: int, timed: bool) -> None:
        call = calls[c]
        for i in range(count):
            index = (offset + i) % len(requests)
            start = time.perf_counter()
            try:
                answer = await call(requests[index], timeout=60, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                elapsed = time.perf_counter() - start
                if timed:
                    tally.latencies.append(elapsed)
                    tally.errors += 1
                if tally.first_error is None:
                    tally.first_error = f"gRPC {exc.code().name}: {(exc.details() or '')[:200]}"
                continue
            tally.record(index, 200, answer, time.perf_counter() - start if timed else None)

    try:
        for index in range(len(requests)):   # the first answer to each input, before the load
            await run(0, 1, index, timed=False)
        await asyncio.gather(*(run(c, warmup, c, timed=False) for c in range(concurrency)))
        shares = [total // concurrency + (1 if c < total % concurrency else 0) for c in range(concurrency)]
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(run(c, shares[c], c, timed=True) for c in range(concurrency)))
        return tally, time.perf_counter() - start, time.process_time() - cpu
    finally:
        for channel in channels:
            await channel.close()


def run_grpc_loadtest(url: str, model: str | None, *, concurrency: int = 8, requests: int = 2000,
                      inputs: np.ndarray | list[np.ndarray] | None = None,
                      input_shape: tuple[int, ...] | None = None, warmup: int = 10, seed: int = 0,
                      metadata: tuple[tuple[str, str], ...] = ()) -> LoadtestResult:
    """`requests` ModelInfer calls over `concurrency` gRPC connections to `url` ("host:port"), timed.

    inputs: one array or a list cycled through (default: 4 random arrays of the model's batch-1 shape).
    metadata: sent with every call, e.g. (("application", "bnfold"),) for Ray Serve's gRPC proxy
    when the cluster runs more than one application.
    """
    if concurrency < 1 or requests < 1:
        raise ServeError(f"concurrency and requests must be at least 1, got {concurrency} and {requests}")
    if not model:
        raise ServeError("--name is required for a gRPC load test: the model's name on the server "
                         "(its RepositoryIndex lists them, as POST /v2/repository/index does over HTTP)")
    target = grpc_target(url)
    input_name, datatype, shape = fetch_grpc_metadata(target, model, metadata)
    inputs = request_inputs(inputs, input_shape or tuple(1 if d == -1 else d for d in shape), datatype, seed)
    encoded = [infer_request(model, input_name, datatype, x) for x in inputs]
    try:
        tally, seconds, cpu = _run(_drive(target, encoded, concurrency, requests, warmup, metadata))
    except OSError as exc:
        raise ServeError(f"gRPC load test against {url} failed: {type(exc).__name__}: {exc}")
    return LoadtestResult.from_tally(url, "grpc", concurrency, tally, seconds, cpu)


__all__ = ["grpc_target", "fetch_grpc_metadata", "infer_request", "run_grpc_loadtest"]
