"""The service's OpenAPI document and a self-contained `/docs` page (no CDN: machines may be offline)."""
from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

from bnfold.serve.runtime import V2_TO_NUMPY, ModelRuntime

_ERROR = {"description": "the caller's mistake, explained",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _example_infer(m: ModelRuntime) -> dict[str, Any]:
    shape = [1 if d == -1 else d for d in m.inputs[0].shape]
    return {"inputs": [{"name": m.input_name, "datatype": m.inputs[0].datatype, "shape": shape,
                        "data": ["..."]}],
            "outputs": [{"name": o.name, "parameters": {"binary_data": False}} for o in m.outputs]}


def openapi_document(models: Mapping[str, ModelRuntime]) -> dict[str, Any]:
    """An OpenAPI 3.1 description of every endpoint, with the served models as examples."""
    first = next(iter(models.values()))
    names = sorted(models)
    model_param = {"name": "model", "in": "path", "required": True,
                   "schema": {"type": "string", "enum": names}}
    version_param = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}

    def ok(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
        body: dict[str, Any] = {"description": description}
        if schema is not None:
            body["content"] = {media: {"schema": schema}}
        return body

    infer_op = {
        "summary": "Run the model on tensors (JSON, or JSON header + binary tensor data)",
        "description": "Open Inference Protocol v2. With the binary tensor extension, the body is the "
                       "JSON header followed by raw little-endian tensor bytes; the header's length is in "
                       "the `Inference-Header-Content-Length` HTTP header and each binary input carries "
                       "`parameters.binary_data_size`. Ask for binary outputs with "
                       "`parameters.binary_data_output` or per output `parameters.binary_data`. "
                       "Any content type is accepted.",
        "parameters": [model_param, {"name": "Inference-Header-Content-Length", "in": "header",
                                     "required": False, "schema": {"type": "integer"}}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"},
                                 "example": _example_infer(first)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": ok("outputs", {"$ref": "#/components/schemas/InferResponse"}),
                      "400": _ERROR, "404": _ERROR, "413": _ERROR},
    }
    with_version = dict(infer_op, parameters=infer_op["parameters"] + [version_param])
    paths: dict[str, Any] = {
        "/v2/health/live": {"get": {"summary": "The process answers", "responses": {"200": ok("live")}}},
        "/v2/health/ready": {"get": {"summary": "Every model is loaded and warmed up",
                                     "responses": {"200": ok("ready"), "503": _ERROR}}},
        "/v2": {"get": {"summary": "Server metadata", "responses": {"200": ok("name, version, extensions")}}},
        "/v2/models/{model}": {"get": {"summary": "Model metadata: inputs and outputs with datatype and "
                                                  "shape (-1 is a dynamic dimension)",
                                       "parameters": [model_param],
                                       "responses": {"200": ok("metadata"), "404": _ERROR}}},
        "/v2/models/{model}/ready": {"get": {"summary": "Model readiness", "parameters": [model_param],
                                             "responses": {"200": ok("ready"), "404": _ERROR}}},
        "/v2/models/{model}/config": {"get": {"summary": "Triton-style model configuration",
                                              "parameters": [model_param], "responses": {"200": ok("config")}}},
        "/v2/models/{model}/infer": {"post": infer_op},
        "/v2/models/{model}/versions/{version}/infer": {"post": with_version},
        "/predictions/{model}": {"post": {
            "summary": "Classify an image file (PNG or JPEG; raw body or multipart/form-data)",
            "description": "The image is preprocessed with the spec stored in the model's metadata "
                           "(mode, resize, crop, mean/std). Example: "
                           "`curl -T digit.png http://127.0.0.1:8000/predictions/lenet`.",
            "parameters": [model_param, {"name": "top_k", "in": "query", "required": False,
                                         "schema": {"type": "integer", "default": 5, "minimum": 1}}],
            "requestBody": {"required": True, "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {"schema": {"type": "object",
                                                   "properties": {"data": {"type": "string", "format": "binary"}}}}}},
            "responses": {"200": ok("top-k labels", {"$ref": "#/components/schemas/Predictions"}),
                          "400": _ERROR, "404": _ERROR, "413": _ERROR}}},
        "/metrics": {"get": {"summary": "Prometheus metrics: requests, errors and latency per model",
                             "responses": {"200": ok("text exposition", {"type": "string"}, "text/plain")}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": ok("OpenAPI 3.1")}}},
        "/docs": {"get": {"summary": "This API as a readable page", "responses": {"200": ok("HTML")}}},
    }
    paths["/predictions/{model}"]["put"] = paths["/predictions/{model}"]["post"]   # what `curl -T` sends
    tensor = {"type": "object", "required": ["name", "shape", "datatype"],
              "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                             "datatype": {"type": "string", "enum": sorted(V2_TO_NUMPY)},  # what requests decode to
                             "data": {"type": "array"}, "parameters": {"type": "object"}}}
    schemas = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Tensor": tensor,
        "InferRequest": {"type": "object", "required": ["inputs"],
                         "properties": {"id": {"type": "string"},
                                        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
                                        "outputs": {"type": "array", "items": {"type": "object"}},
                                        "parameters": {"type": "object"}}},
        "InferResponse": {"type": "object",
                          "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                                         "id": {"type": "string"},
                                         "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}}}},
        "Predictions": {"type": "object", "properties": {
            "model": {"type": "string"},
            "predictions": {"type": "array", "items": {"type": "object", "properties": {
                "label": {"type": "string"}, "index": {"type": "integer"}, "probability": {"type": "number"}}}}}},
    }
    return {"openapi": "3.1.0",
            "info": {"title": "bnfold inference service", "version": "0.1.0",
                     "description": "Open Inference Protocol v2 (KServe v2 / Triton HTTP) for ONNX models "
                                    f"with BatchNorm folded in. Models: {', '.join(names)}."},
            "paths": paths, "components": {"schemas": schemas},
            "x-models": {n: {"inputs": [t.to_dict() for t in m.inputs],
                             "outputs": [t.to_dict() for t in m.outputs], "version": m.version,
                             "device": m.device} for n, m in models.items()}}


def docs_html(document: dict[str, Any]) -> str:
    """A readable page of the OpenAPI document, rendered on the server: no scripts, no CDN."""
    esc = html.escape
    rows = []
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            params = ", ".join(f"<code>{esc(p['name'])}</code> ({esc(p['in'])})" for p in op.get("parameters", []))
            codes = ", ".join(sorted(op.get("responses", {})))
            desc = esc(op.get("description", ""))
            example = ""
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if "example" in body:
                example = f"<pre>{esc(json.dumps(body['example'], indent=1))}</pre>"
            rows.append(f"<section><h3><span class='m'>{method.upper()}</span> <code>{esc(path)}</code></h3>"
                        f"<p><b>{esc(op.get('summary', ''))}</b></p><p>{desc}</p>"
                        f"<p>Parameters: {params or 'none'} &middot; responses: {codes}</p>{example}</section>")
    models = "".join(f"<li><code>{esc(n)}</code> v{esc(str(m['version']))} on {esc(m['device'])}: inputs "
                     f"<code>{esc(json.dumps(m['inputs']))}</code>, outputs <code>{esc(json.dumps(m['outputs']))}</code></li>"
                     for n, m in document.get("x-models", {}).items())
    info = document["info"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(info['title'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}
section{{border-top:1px solid #ddd;padding:.3rem 0}}code,pre{{background:#f4f4f4;padding:.1rem .3rem}}
pre{{padding:.5rem;overflow:auto}}.m{{display:inline-block;min-width:3.5rem;color:#fff;background:#2a6;
padding:.1rem .4rem;border-radius:3px;font-size:.8em}}</style></head><body>
<h1>{esc(info['title'])} <small>{esc(info['version'])}</small></h1><p>{esc(info['description'])}</p>
<h2>Models</h2><ul>{models}</ul>
<p>Errors are <code>{{"error": "..."}}</code> with a 4xx status for the caller's mistakes.
The machine-readable description is at <a href="/openapi.json">/openapi.json</a>.</p>
<h2>Endpoints</h2>{''.join(rows)}</body></html>
"""
