"""The service's OpenAPI document, generated from the route table, and a self-contained `/docs` page.

Each `Route` gives its path, methods and summary; the longer parts of an operation (request
bodies, extra parameters, responses) are the `*_DOC` values below, which the table refers to.
Path parameters are filled in from the pattern: `{model}` is an enum of the served names.
No CDN in the page: machines that serve models may be offline.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from bnfold.serve.page import html_headers
from bnfold.serve.routes import Headers, Route
from bnfold.serve.runtime import V2_TO_NUMPY, Runtime
from bnfold.versions import __version__

_ERROR = {"description": "the caller's mistake, explained",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def ok(description: str, schema: dict | None = None, media: str = "application/json") -> dict[str, Any]:
    body: dict[str, Any] = {"description": description}
    if schema is not None:
        body["content"] = {media: {"schema": schema}}
    return body


def _example_infer(m: Runtime) -> dict[str, Any]:
    shape = [1 if d == -1 else d for d in m.inputs[0].shape]
    return {"inputs": [{"name": m.inputs[0].name, "datatype": m.inputs[0].datatype, "shape": shape,
                        "data": ["..."]}],
            "outputs": [{"name": o.name, "parameters": {"binary_data": False}} for o in m.outputs]}


def infer_doc(models: Mapping[str, Runtime]) -> dict[str, Any]:
    return {
        "description": "Open Inference Protocol v2. With the binary tensor extension, the body is the "
                       "JSON header followed by raw little-endian tensor bytes; the header's length is in "
                       "the `Inference-Header-Content-Length` HTTP header and each binary input carries "
                       "`parameters.binary_data_size`. Ask for binary outputs with "
                       "`parameters.binary_data_output` or per output `parameters.binary_data`, and for "
                       "the top k classes of an output with `parameters.classification: k` (BYTES "
                       "\"value:index:label\" strings, as Triton answers). In JSON outputs NaN and "
                       "infinities are the strings \"NaN\", \"Infinity\", \"-Infinity\". The batch is "
                       "at most the model's max_batch_size (see /config). Any content type is accepted; "
                       "`Content-Encoding: gzip` or `deflate` bodies are inflated up to the body limit.",
        "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                        "schema": {"type": "integer"}}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"},
                                 "example": _example_infer(next(iter(models.values())))},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": ok("outputs", {"$ref": "#/components/schemas/InferResponse"}),
                      "400": _ERROR, "404": _ERROR, "413": _ERROR, "415": _ERROR},
    }


PREDICTIONS_DOC: dict[str, Any] = {
    "description": "The image is preprocessed with the spec stored in the model's metadata "
                   "(mode, resize, crop, mean/std). Example: "
                   "`curl -T digit.png http://127.0.0.1:8000/predictions/lenet`. In a multipart body "
                   "the first part with a filename is the image. The answer says what was done to the "
                   "image (its size, mode and format as sent, each conversion in words) in `image` and in "
                   "the `bnfold-image` header; an image enlarged more than 4 times, shrunk more than 32 "
                   "times or with an aspect ratio more than 2:1 off the model's gets `image.warning` and a "
                   "`bnfold-image-warning` header, or is refused with 422 when the server runs with "
                   "--strict-images.",
    "parameters": [{"name": "top_k", "in": "query", "required": False,
                    "schema": {"type": "integer", "default": 5, "minimum": 1}}],
    "requestBody": {"required": True, "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object",
                                           "properties": {"data": {"type": "string", "format": "binary"}}}}}},
    "responses": {"200": {**ok("top-k labels and what was done to the image",
                               {"$ref": "#/components/schemas/Predictions"}),
                          "headers": {
                              "bnfold-image": {"description": "the image as sent and each conversion, in one "
                                                              "line: `1x1 RGB PNG; colour to grey (RGB -> L); "
                                                              "resized 1x1 -> 28x28 (x28)`",
                                               "schema": {"type": "string"}},
                              "bnfold-image-warning": {"description": "present when the image is far from the "
                                                                      "model's input size or aspect ratio",
                                                       "schema": {"type": "string"}}}},
                  "400": _ERROR, "404": _ERROR, "413": _ERROR,
                  "422": {**_ERROR, "description": "the image cannot be used (or, with --strict-images, is far "
                                                   "from the model's input)"}},
}


def _path_parameter(name: str, models: Sequence[str]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if name == "model":
        schema["enum"] = list(models)
    return {"name": name, "in": "path", "required": True, "schema": schema}


def openapi_document(routes: Sequence[Route], models: Mapping[str, Runtime]) -> dict[str, Any]:
    """An OpenAPI 3.1 description of every route in `routes`, with the served models as examples."""
    names = sorted(models)
    paths: dict[str, Any] = {}
    for route in routes:
        doc = dict(route.doc(models) if callable(route.doc) else route.doc)
        parameters = [_path_parameter(p, names) for p in route.params] + doc.pop("parameters", [])
        operation: dict[str, Any] = {"summary": route.summary, **doc}
        if parameters:
            operation["parameters"] = parameters
        responses = operation.setdefault("responses", {"200": ok("OK")})
        if route.params and "404" not in responses:
            operation["responses"] = {**responses, "404": _ERROR}
        for method in route.allowed:
            paths.setdefault(route.path, {})[method.lower()] = operation
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
                "label": {"type": "string"}, "index": {"type": "integer"}, "probability": {"type": "number"}}}},
            "image": {"type": "object", "description": "the image as sent and what preprocessing did to it",
                      "required": ["width", "height", "mode", "format", "conversions", "scale"], "properties": {
                          "width": {"type": "integer"}, "height": {"type": "integer"},
                          "mode": {"type": "string", "description": "PIL mode as sent: L, RGB, RGBA, P, I;16 ..."},
                          "format": {"type": ["string", "null"], "description": "PNG, JPEG, ..."},
                          "conversions": {"type": "array", "items": {"type": "string"},
                                          "description": "each change, in order, in words; empty when the "
                                                         "image was used as is"},
                          "scale": {"type": "number", "description": "resize factor of the shorter side "
                                                                     "(above 1: enlarged)"},
                          "warning": {"type": "string", "description": "only when the image is far from the "
                                                                       "model's input size or aspect ratio"}}}}},
    }
    return {"openapi": "3.1.0",
            "info": {"title": "bnfold inference service", "version": __version__,
                     "description": "Open Inference Protocol v2 (KServe v2 / Triton HTTP) for ONNX models "
                                    f"with BatchNorm folded in. Models: {', '.join(names)}."},
            "paths": paths, "components": {"schemas": schemas},
            "x-models": {n: {"inputs": [t.to_dict() for t in m.inputs],
                             "outputs": [t.to_dict() for t in m.outputs], "version": m.version,
                             "device": m.device} for n, m in models.items()}}


# The /docs page's only style, inline; its hash is the one style the page's policy allows.
_DOCS_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
section{border-top:1px solid #ddd;padding:.3rem 0}code,pre{background:#f4f4f4;padding:.1rem .3rem}
pre{padding:.5rem;overflow:auto}.m{display:inline-block;min-width:3.5rem;color:#fff;background:#2a6;
padding:.1rem .4rem;border-radius:3px;font-size:.8em}"""
_DOCS_STYLE_HASH = "'sha256-" + base64.b64encode(hashlib.sha256(_DOCS_STYLE.encode()).digest()).decode() + "'"
# No script at all, no images, nothing loaded: the page is text and links.
DOCS_HEADERS: Headers = html_headers(f"default-src 'none'; style-src {_DOCS_STYLE_HASH}; base-uri 'none'; "
                                     f"form-action 'none'; frame-ancestors 'none'")


def docs_html(document: dict[str, Any]) -> str:
    """A readable page of the OpenAPI document, rendered on the server: no scripts, no CDN.

    Serve it with `DOCS_HEADERS` (its Content-Security-Policy allows its one inline style only).
    """
    esc = html.escape
    rows = []
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            if method == "head":   # the same operation as GET, listed once
                continue
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
<style>{_DOCS_STYLE}</style></head><body>
<h1>{esc(info['title'])} <small>{esc(info['version'])}</small></h1><p>{esc(info['description'])}</p>
<h2>Models</h2><ul>{models}</ul>
<p>Errors are <code>{{"error": "..."}}</code> with a 4xx status for the caller's mistakes.
The machine-readable description is at <a href="/openapi.json">/openapi.json</a>.</p>
<h2>Endpoints</h2>{''.join(rows)}</body></html>
"""
