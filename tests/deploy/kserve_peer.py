"""Run in the KServe peer environment (bench.peers: .peers/kserve) by tests/deploy: KServe's own code.

    python kserve_peer.py schema FILE.yaml ...      # each KServe document against the SDK's models
    python kserve_peer.py client REQUEST.json       # KServe's REST (and gRPC) clients against a server

Prints one JSON document on stdout; the tests in this folder read it.
"""
from __future__ import annotations

import asyncio
import json
import sys

import yaml

KINDS = {("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
         ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
         ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService"}
SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "datetime": (str,),
           "date": (str,)}


def _model(name: str):
    import kubernetes.client
    import kserve

    return getattr(kserve, name, None) or getattr(kubernetes.client, name, None)


def check(value, kind: str, path: str, errors: list[str]) -> None:
    """`value` (parsed YAML) against the OpenAPI type `kind` of the generated SDK models, strictly:
    unknown fields, wrong types and missing required fields are errors."""
    if kind.lower().startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list ({kind}), got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            check(item, kind[5:-1], f"{path}[{i}]", errors)
        return
    if kind.lower().startswith(("dict(", "dict[")):   # dict(str, str) in kserve's models, Dict[str, str] in kubernetes
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping ({kind}), got {type(value).__name__}")
            return
        inner = kind[kind.index(",") + 1:-1].strip()
        for key, item in value.items():
            check(item, inner, f"{path}.{key}", errors)
        return
    if kind == "object":
        return
    if kind in SCALARS:
        if not isinstance(value, SCALARS[kind]) or (kind != "bool" and isinstance(value, bool)):
            errors.append(f"{path}: expected {kind}, got {type(value).__name__} {value!r}")
        return
    cls = _model(kind)
    if cls is None:
        errors.append(f"{path}: no model class {kind} in kserve or kubernetes.client")
        return
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {kind} mapping, got {type(value).__name__}")
        return
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    kwargs = {}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: not a field of {kind}")
            continue
        check(item, cls.openapi_types[by_json[key]], f"{path}.{key}", errors)
        kwargs[by_json[key]] = item
    try:   # the generated constructors refuse a missing required field (and values outside an enum)
        cls(**kwargs)
    except (ValueError, TypeError) as exc:
        errors.append(f"{path}: {kind}: {exc}")


def schema(paths: list[str]) -> dict:
    report = {}
    for path in paths:
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                kind = KINDS.get((doc.get("apiVersion"), doc.get("kind")))
                if kind is None:
                    continue
                errors: list[str] = []
                check(doc, kind, doc["kind"], errors)
                report[f"{path}#{i} {doc['kind']}"] = errors
    return report


async def client(request: dict) -> dict:
    import httpx
    import numpy as np
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    name, x = request["model"], np.asarray(request["input"], dtype=np.float32)
    out: dict = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=30))
    base = request["http"]
    out["rest_live"] = await rest.is_server_live(base)
    out["rest_ready"] = await rest.is_server_ready(base)
    out["rest_model_ready"] = await rest.is_model_ready(base, name)
    # KServe 0.21's REST client has no metadata call; its protocol module's route, with httpx as it uses
    out["metadata"] = httpx.get(f"{base}/v2/models/{name}", timeout=30).json()
    infer = InferRequest(model_name=name, infer_inputs=[InferInput(request["input_name"], list(x.shape), "FP32", x)])
    response = await rest.infer(base, infer, model_name=name)
    out["rest_output"] = response.outputs[0].as_numpy().tolist()
    out["rest_output_name"] = response.outputs[0].name
    await rest.close()
    if request.get("grpc"):
        grpc_client = InferenceGRPCClient(request["grpc"], timeout=30)
        out["grpc_live"] = await grpc_client.is_server_live()
        out["grpc_ready"] = await grpc_client.is_server_ready()
        out["grpc_model_ready"] = await grpc_client.is_model_ready(name)
        infer = InferRequest(model_name=name,
                             infer_inputs=[InferInput(request["input_name"], list(x.shape), "FP32", x)])
        response = await grpc_client.infer(infer)
        out["grpc_output"] = response.outputs[0].as_numpy().tolist()
        await grpc_client.close()
    return out


if __name__ == "__main__":
    verb, args = sys.argv[1], sys.argv[2:]
    if verb == "schema":
        print(json.dumps(schema(args)))
    else:
        with open(args[0]) as f:
            print(json.dumps(asyncio.run(client(json.load(f)))))
