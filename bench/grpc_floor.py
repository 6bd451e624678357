"""The floor of a Python gRPC server: `grpc.aio` answering every ModelInfer with prebuilt bytes.

    python -m bnfold.bench.grpc_floor --port 8001 --answer response.bin

No parsing, no model, no metrics: the handler hands back the same serialized
`ModelInferResponse` (written by `compare_kserve` from a real answer, so clients decode it)
for whatever it receives. What a client measures against it is grpcio's own cost, server and
client, on this machine: the least any server built on grpcio (bnfold's, KServe's) can take.
It listens on 127.0.0.1 only, on the same event loop type bnfold serve uses (uvloop).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_SERVICE = "inference.GRPCInferenceService"


async def _serve(port: int, answer: bytes) -> None:
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
    print(f"grpc floor on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnfold.bench.grpc_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--answer", required=True, help="file holding the serialized ModelInferResponse to send")
    args = parser.parse_args(argv)
    answer = Path(args.answer).read_bytes()
    import uvloop

    try:
        uvloop.run(_serve(args.port, answer))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
