"""The yardstick for `bench.compare_ray`: an ONNX model on Ray Serve the way Ray's documentation shows it.

An onnxruntime session (one intra-op thread) in a `@serve.deployment` class whose `__call__` takes
Starlette's `Request`, reads a JSON body and returns a dict (Ray turns it into JSON): nothing
tuned, Ray Serve's defaults. It is not part of bnfold's service; it stands for what `bnfold serve
--ray` is measured against, as `bench.reference_service` does for the single-process service.

`POST {route_prefix}/predict` (any path under the prefix) with `{"data": [784 floats]}` answers
`{"logits": [10 floats]}`, the same body as the reference service, so `bench.loadtest` drives both.

    python -m bnfold.bench.ray_plain MODEL.onnx --address HOST:PORT [--replicas 2] [--replica-cpus 1]

Runs in Ray's environment (the `bnfold[ray]` extra, or the Ray peer of bench.ray_cluster).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from starlette.requests import Request

APP_NAME = "plain"
ROUTE_PREFIX = "/plain"


@serve.deployment(name="PlainOnnx")
class PlainOnnx:
    def __init__(self, model_path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.shape = [d if isinstance(d, int) else 1 for d in first.shape]

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        x = np.asarray(body["data"], dtype=np.float32).reshape(self.shape)
        logits = self.session.run(None, {self.input_name: x})[0]
        return {"logits": logits[0].tolist()}


def deploy(model_path: str | os.PathLike, address: str, *, replicas: int = 2, replica_cpus: float = 1.0,
           port: int = 8000) -> list[str]:
    """Deploy the plain application on the cluster at `address` (HTTP through Ray Serve's proxy on `port`);
    its replicas' own URLs when the cluster runs Ray's direct ingress, else []."""
    from bnfold.serve.ray_app import direct_ingress_urls

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = PlainOnnx.options(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus}).bind(
            str(Path(model_path).resolve()))
        serve.run(app, name=APP_NAME, route_prefix=ROUTE_PREFIX)
        return direct_ingress_urls(APP_NAME, "127.0.0.1", replicas)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bnfold.bench.ray_plain",
                                description="deploy the plain Ray Serve ONNX deployment (the comparison's yardstick)")
    p.add_argument("model", help="the ONNX file (the same path on every node)")
    p.add_argument("--address", required=True, help="the Ray cluster's address, host:port")
    p.add_argument("--replicas", type=int, default=2, help="replicas (default 2)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    p.add_argument("--port", type=int, default=8000, help="Ray Serve's HTTP port, if Serve is not yet started")
    args = p.parse_args(argv)
    from bnfold.serve.config import RAY_DIRECT_LINE as DIRECT_LINE

    direct = deploy(args.model, args.address, replicas=args.replicas, replica_cpus=args.replica_cpus, port=args.port)
    print(f"plain Ray Serve deployment RUNNING under {ROUTE_PREFIX}", file=sys.stderr)
    if direct:
        print(f"{DIRECT_LINE} {' '.join(direct)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
