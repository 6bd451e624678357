"""Open Inference Protocol v2 inference bodies: JSON tensors and the binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes; the header's length is
the `Inference-Header-Content-Length` HTTP header, and each binary input says its size in
`parameters.binary_data_size`. Responses mirror that. Everything here is pure: bytes in, arrays
out (and back), with a `ServeError` naming what was expected for every malformed request.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.serve.runtime import (ModelRuntime, ServeError, TensorMeta, check_datatype, check_input_name,
                           check_shape)


@dataclass
class InferRequest:
    """A decoded inference request for a one-input model."""

    array: np.ndarray
    outputs: list[tuple[TensorMeta, bool]]   # which outputs to return, and whether as binary
    id: str | None = None


def parse_header_length(value: bytes | None, body_size: int) -> int | None:
    """The JSON header's length from `Inference-Header-Content-Length`, checked against the body."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise ServeError(f"Inference-Header-Content-Length must be an integer, got {value[:40]!r}")
    if length < 0 or length > body_size:
        raise ServeError(f"Inference-Header-Content-Length is {length} but the body has {body_size} bytes")
    return length


def _load_json(raw: bytes | memoryview) -> dict[str, Any]:
    if len(raw) == 0:
        raise ServeError("empty request body: expected a JSON inference request "
                         '{"inputs": [{"name", "shape", "datatype", "data"}]}')
    try:
        header = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServeError(f"malformed JSON in the inference request: {exc}")
    if not isinstance(header, dict):
        raise ServeError(f"the inference request must be a JSON object, got {type(header).__name__}")
    return header


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise ServeError(f"'parameters' of {where} must be an object, got {json.dumps(params)[:60]}")
    return params


def _tensor_from_json(model: ModelRuntime, name: str, dtype: np.dtype, shape: tuple[int, ...],
                      data: Any) -> np.ndarray:
    count = math.prod(shape)
    try:
        array = np.asarray(data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError):
        raise ServeError(f"'data' of input {name!r} for model {model.name!r} must be a (nested) list of "
                         f"numbers for datatype {model.inputs[0].datatype}")
    if array.size != count:
        raise ServeError(f"unexpected number of elements for input {name!r} for model {model.name!r}. "
                         f"Shape {list(shape)} needs {count}, got {array.size}")
    return array.reshape(shape)


def parse_infer(model: ModelRuntime, body: bytes, header_length: int | None) -> InferRequest:
    """Decode a v2 infer request for `model`; raises ServeError (400) naming the problem."""
    view = memoryview(body)
    header = _load_json(view[:header_length] if header_length is not None else view)
    binary = view[header_length:] if header_length is not None else view[:0]

    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        got = len(inputs) if isinstance(inputs, list) else json.dumps(inputs)[:60]
        raise ServeError(f"model {model.name!r} expects 'inputs' to be a list of 1 tensor "
                         f"({model.input_name!r}), got {got}")
    tensor = inputs[0]
    name = check_input_name(model, tensor.get("name"))
    dtype = check_datatype(model, name, tensor.get("datatype"))
    shape = check_shape(model, name, tensor.get("shape"))
    size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
    if size is not None:
        needed = math.prod(shape) * dtype.itemsize
        if type(size) is not int or size < 0:
            raise ServeError(f"binary_data_size of input {name!r} must be a non-negative integer, got {size!r}")
        if size != needed:
            raise ServeError(f"unexpected binary_data_size for input {name!r} for model {model.name!r}. "
                             f"Shape {list(shape)} of {model.inputs[0].datatype} needs {needed} bytes, "
                             f"got {size}")
        if len(binary) < size:
            raise ServeError(f"truncated binary data for input {name!r} for model {model.name!r}: "
                             f"expected {size} bytes after the JSON header, got {len(binary)}")
        if len(binary) > size:
            raise ServeError(f"unexpected {len(binary) - size} bytes of binary data after input {name!r} "
                             f"for model {model.name!r} (expected {size} bytes in all)")
        array = np.frombuffer(binary, dtype=dtype).reshape(shape)
    else:
        if len(binary):
            raise ServeError(f"{len(binary)} bytes of binary data came after the JSON header, but no input "
                             f"declares parameters.binary_data_size")
        if "data" not in tensor:
            raise ServeError(f"input {name!r} for model {model.name!r} has neither 'data' nor "
                             f"parameters.binary_data_size")
        array = _tensor_from_json(model, name, dtype, shape, tensor["data"])

    request_id = header.get("id")
    binary_default = bool(_parameters(header, "the request").get("binary_data_output", False))
    return InferRequest(array=array, outputs=_requested_outputs(model, header.get("outputs"), binary_default),
                        id=None if request_id is None else str(request_id))


def _requested_outputs(model: ModelRuntime, requested: Any, binary_default: bool) -> list[tuple[TensorMeta, bool]]:
    if requested is None:
        return [(meta, binary_default) for meta in model.outputs]
    if not isinstance(requested, list):
        raise ServeError(f"'outputs' must be a list of {{\"name\": ...}} objects, got {json.dumps(requested)[:60]}")
    by_name = {meta.name: meta for meta in model.outputs}
    chosen = []
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in by_name:
            raise ServeError(f"unexpected inference output {json.dumps(name)} for model {model.name!r}. "
                             f"Expected one of {sorted(by_name)}")
        binary = _parameters(item, f"output {name!r}").get("binary_data", binary_default)
        chosen.append((by_name[name], bool(binary)))
    return chosen


class RequestParser:
    """`parse_infer` for one model, with validated binary-request headers remembered.

    A client sending binary tensors repeats the same JSON header byte for byte (same shape,
    same outputs, no id), so after the first request the header is a dictionary lookup and
    the tensor a `numpy.frombuffer` view: no JSON decoding and no re-validation.
    """

    def __init__(self, model: ModelRuntime, capacity: int = 256) -> None:
        self.model = model
        self.capacity = capacity
        self._plans: dict[bytes, tuple[tuple[int, ...], np.dtype, int, list[tuple[TensorMeta, bool]]]] = {}

    def parse(self, body: bytes, header_length: int | None) -> InferRequest:
        if header_length is None:
            return parse_infer(self.model, body, None)
        header = body[:header_length]
        plan = self._plans.get(header)
        if plan is not None and len(body) - header_length == plan[2]:
            shape, dtype, _, outputs = plan
            return InferRequest(np.frombuffer(body, dtype, offset=header_length).reshape(shape), outputs)
        request = parse_infer(self.model, body, header_length)   # validates; raises on any mistake
        if request.id is None and len(self._plans) < self.capacity and len(body) > header_length:
            self._plans[header] = (request.array.shape, request.array.dtype, len(body) - header_length,
                                   request.outputs)
        return request


class ResponseEncoder:
    """Builds v2 infer responses for one model; JSON headers of binary answers are cached per shape.

    At batch 1 the header of a binary response never changes, so after the first request the
    answer is a dictionary lookup plus the output bytes.
    """

    def __init__(self, model: ModelRuntime) -> None:
        self.model = model
        self._prefix = {"model_name": model.name, "model_version": model.version}
        self._cache: dict[tuple, bytes] = {}

    def encode(self, request: InferRequest, results: list[np.ndarray]) -> tuple[bytes, int | None]:
        """(body, header length or None when the body is JSON only)."""
        by_name = dict(zip(self.model._output_names, results))
        chosen = [(meta, binary, by_name[meta.name]) for meta, binary in request.outputs]
        any_binary = any(binary for _, binary, _ in chosen)
        key = None
        if request.id is None and all(binary for _, binary, _ in chosen):
            key = tuple((meta.name, array.shape) for meta, _, array in chosen)
            header = self._cache.get(key)
            if header is not None:
                return header + b"".join(array.tobytes() for _, _, array in chosen), len(header)
        outputs = []
        blobs = []
        for meta, binary, array in chosen:
            entry: dict[str, Any] = {"name": meta.name, "datatype": meta.datatype, "shape": list(array.shape)}
            if binary:
                data = array.tobytes()   # C order whatever the array's layout
                entry["parameters"] = {"binary_data_size": len(data)}
                blobs.append(data)
            else:
                entry["data"] = array.ravel().tolist()
            outputs.append(entry)
        body: dict[str, Any] = dict(self._prefix)
        if request.id is not None:
            body["id"] = request.id
        body["outputs"] = outputs
        header = json.dumps(body, separators=(",", ":")).encode()
        if key is not None and len(self._cache) < 64:
            self._cache[key] = header
        if not any_binary:
            return header, None
        return header + b"".join(blobs), len(header)
