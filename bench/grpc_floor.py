"""The floor of a Python gRPC server: a server answering every ModelInfer with prebuilt bytes.

    python -m bnfold.bench.grpc_floor --grpc-port 8001 --answer response.bin [--kind aio|sync|h2]
    python -m bnfold.bench.grpc_floor --compare          # every kind, timed with tritonclient.grpc

No parsing, no model, no metrics: the handler hands back the same serialized
`ModelInferResponse` for whatever it receives (`compare_kserve` writes one from a real answer, so
clients decode it). What a client measures against it is the transport's own cost, server and
client, on this machine: the least any server built on that transport can take. Kinds:

- `aio`: grpcio's `grpc.aio` on uvloop, what bnfold serve and KServe's ModelServer use;
- `sync`: grpcio's thread-pool server;
- `h2`: no gRPC library at all: the `h2` HTTP/2 state machine (`pip install h2`; not a bnfold
  dependency) on an asyncio protocol, replying with the length-prefixed message and the
  `grpc-status` trailer; the lower bound of servers written on h2 (grpclib, hypercorn).

`--compare` starts each kind in turn (those whose package is installed), times `--requests`
sequential `tritonclient.grpc` infers of a 1x1x28x28 FP32 tensor against each, and prints p50 and
the client's own CPU time per call: with a client that spends that much per call, no server makes
the round trip shorter than it. All listen on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SERVICE = "inference.GRPCInferenceService"
KINDS = ("aio", "sync", "h2")


async def _serve_aio(port: int, answer: bytes) -> None:
    import grpc

    async def infer(request: bytes, context: object) -> bytes:
        return answer

    async def live(request: bytes, context: object) -> bytes:
        return b"\x08\x01"   # ServerLiveResponse(live=True), so readiness probes pass

    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
                "ServerLive": grpc.unary_unary_rpc_method_handler(live)}   # bytes in, bytes out
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpc floor (aio) on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def _serve_sync(port: int, answer: bytes) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(lambda request, context: answer),
                "ServerLive": grpc.unary_unary_rpc_method_handler(lambda request, context: b"\x08\x01")}
    server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"grpc floor (sync) on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.wait_for_termination()


async def _serve_h2(port: int, answer: bytes) -> None:
    import h2.config
    import h2.connection
    import h2.events

    framed = {f"/{_SERVICE}/ModelInfer": b"\x00" + len(answer).to_bytes(4, "big") + answer,
              f"/{_SERVICE}/ServerLive": b"\x00\x00\x00\x00\x02\x08\x01"}
    head = [(":status", "200"), ("content-type", "application/grpc")]

    class Connection(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                           header_encoding="ascii"))
            self.h2.initiate_connection()
            self.paths: dict[int, str] = {}
            transport.write(self.h2.data_to_send())

        def data_received(self, data: bytes) -> None:
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.paths[event.stream_id] = dict(event.headers).get(":path", "")
                elif isinstance(event, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    body = framed.get(self.paths.pop(event.stream_id, ""))
                    self.h2.send_headers(event.stream_id, head)
                    if body is None:
                        self.h2.send_headers(event.stream_id, [("grpc-status", "12")], end_stream=True)
                        continue
                    self.h2.send_data(event.stream_id, body)
                    self.h2.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
            self.transport.write(self.h2.data_to_send())

    server = await asyncio.get_running_loop().create_server(Connection, "127.0.0.1", port)
    print(f"grpc floor (h2) on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.serve_forever()


def serve(kind: str, port: int, answer: bytes) -> None:
    """Run the `kind` floor server on 127.0.0.1:`port` until interrupted."""
    import uvloop

    try:
        if kind == "sync":
            _serve_sync(port, answer)
        else:
            uvloop.run((_serve_aio if kind == "aio" else _serve_h2)(port, answer))
    except KeyboardInterrupt:
        pass


def sample_answer() -> bytes:
    """A ModelInferResponse as a LeNet server sends it: one 1x10 FP32 output, raw contents."""
    from tritonclient.grpc import service_pb2 as pb

    response = pb.ModelInferResponse(model_name="lenet", model_version="1")
    response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(bytes(40))
    return response.SerializeToString()


def _installed(kind: str) -> bool:
    if kind != "h2":
        return True
    try:
        import h2  # noqa: F401
    except ImportError:
        return False
    return True


def time_client(address: str, requests: int, warmup: int = 200) -> tuple[float, float]:
    """`requests` sequential tritonclient.grpc infers: (p50 ms, the client's CPU ms per call)."""
    import numpy as np
    import tritonclient.grpc as triton_grpc

    with triton_grpc.InferenceServerClient(address) as client:
        tensor = triton_grpc.InferInput("input", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32))
        for _ in range(warmup):
            client.infer("lenet", [tensor])
        times = []
        cpu = time.process_time()
        for _ in range(requests):
            start = time.perf_counter()
            client.infer("lenet", [tensor]).as_numpy("logits")
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3, (time.process_time() - cpu) / requests * 1e3


def compare(requests: int, rounds: int) -> list[tuple[str, float, float]]:
    """Each installed kind, `rounds` times in turn: (kind, p50 ms, client CPU ms per call), pooled by median."""
    from bnfold.bench.compare_kserve import _wait_for_grpc
    from bnfold.serve.launch import free_port

    results: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS if _installed(k)}
    with tempfile.TemporaryDirectory(prefix="bnfold-floor-") as scratch:
        answer = Path(scratch) / "answer.bin"
        answer.write_bytes(sample_answer())
        for _ in range(rounds):
            for kind in results:
                port = free_port()
                process = subprocess.Popen([sys.executable, "-m", "bnfold.bench.grpc_floor", "--grpc-port", str(port),
                                            "--answer", str(answer), "--kind", kind], stderr=subprocess.DEVNULL)
                try:
                    _wait_for_grpc(f"127.0.0.1:{port}")
                    results[kind].append(time_client(f"127.0.0.1:{port}", requests))
                finally:
                    process.terminate()
                    process.wait()
    return [(k, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            for k, runs in results.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnfold.bench.grpc_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc-port", type=int, help="port on 127.0.0.1 (serving one kind)")
    parser.add_argument("--answer", help="file holding the serialized ModelInferResponse to send")
    parser.add_argument("--kind", choices=KINDS, default="aio", help="which server (default aio)")
    parser.add_argument("--compare", action="store_true", help="time every installed kind with tritonclient.grpc")
    parser.add_argument("--requests", type=int, default=2000, help="--compare: timed requests per kind and round")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: rounds over the kinds")
    args = parser.parse_args(argv)
    if args.compare:
        missing = [k for k in KINDS if not _installed(k)]
        for kind, p50, cpu in compare(args.requests, args.rounds):
            print(f"{kind:5s} p50 {p50:.3f} ms   tritonclient.grpc's own CPU {cpu:.3f} ms per call")
        if missing:
            print(f"not measured (package not installed): {', '.join(missing)}", file=sys.stderr)
        return 0
    if args.grpc_port is None or args.answer is None:
        parser.error("--grpc-port and --answer are required unless --compare")
    if not _installed(args.kind):
        parser.error("--kind h2 needs the h2 package: pip install h2")
    serve(args.kind, args.grpc_port, Path(args.answer).read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
