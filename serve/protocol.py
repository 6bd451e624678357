"""Open Inference Protocol v2 inference bodies: JSON tensors and the binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes; the header's length is
the `Inference-Header-Content-Length` HTTP header, and each binary input says its size in
`parameters.binary_data_size`. Responses mirror that. Everything here is pure: bytes in, arrays
out (and back), with a `ServeError` naming what was expected for every malformed request. It
reads a model only through the `Runtime` protocol (names, tensors, spec, batch limit).

JSON is parsed and written by orjson (C); a request's "data" goes from orjson's lists to numpy in
one call. Types are strict, as the protocol's schema says: "data" holds numbers only (no null, no
strings, no true/false for a number type, no fractions for an integer type, only true/false for
BOOL), and every parameter has its type (`binary_data` and `binary_data_output` are booleans); a
wrong type is a 400 naming the field. null stands for an absent optional field, as in protobuf's
JSON mapping.

Two rules a client can rely on: a float output that is NaN or infinite is written in JSON as the
string "NaN", "Infinity" or "-Infinity" (protobuf's JSON mapping; numpy and tritonclient read them
back), never as a bare token that is not JSON; and the classification extension answers an output
requested with `parameters.classification: k` as the top k "value:index[:label]" strings (BYTES),
as Triton does.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson

from bnfold.serve.errors import ServeError
from bnfold.serve.runtime import KNOWN_DATATYPES, V2_TO_NUMPY, Runtime, TensorMeta


class OutputRequest(NamedTuple):
    """One output to return: as binary or JSON, and as its top `classes` labels when that is > 0."""

    meta: TensorMeta
    binary: bool
    classes: int = 0


@dataclass
class InferRequest:
    """A decoded inference request for a one-input model."""

    array: np.ndarray
    outputs: list[OutputRequest]   # which outputs to return, and how
    id: str | None = None


# ---------------------------------------------------------------------------------------------
# Input checks: each names what was expected and what came (Triton's wording).


def check_datatype(model: Runtime, name: str, datatype: Any) -> np.dtype:
    expected = model.inputs[0].datatype
    if datatype != expected:
        if not isinstance(datatype, str) or datatype not in KNOWN_DATATYPES:
            raise ServeError(f"invalid datatype {_short(datatype)} for input {name!r} for model "
                             f"{model.name!r}. Expected {expected}")
        raise ServeError(f"unexpected datatype {datatype} for input {name!r} for model {model.name!r}. "
                         f"Expected {expected}")
    return V2_TO_NUMPY[expected]


def check_shape(model: Runtime, name: str, shape: Any) -> tuple[int, ...]:
    """The shape as a tuple once it fits the model's input and its batch limit."""
    expected = model.inputs[0].shape
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
        raise ServeError(f"invalid shape {_short(shape)} for input {name!r} for model {model.name!r}: "
                         f"expected a list of non-negative integers like {_shape_str(expected)}")
    if len(shape) != len(expected) or any(e != -1 and e != d for e, d in zip(expected, shape)):
        raise ServeError(f"unexpected shape for input {name!r} for model {model.name!r}. "
                         f"Expected {_shape_str(expected)}, got {_shape_str(shape)}")
    if expected and expected[0] == -1 and shape[0] == 0:
        # An empty batch asks for nothing: answered 200 with empty outputs, it hid a client's bug.
        raise ServeError(f"batch size 0 of input {name!r} for model {model.name!r}: a request carries at least "
                         f"one row")
    limit = model.max_batch_size
    if limit and shape[0] > limit:
        raise ServeError(f"batch size {shape[0]} of input {name!r} for model {model.name!r} is over the limit "
                         f"of max_batch_size {limit} (raise it with `bnfold serve --max-batch-size`, or "
                         f"max_batch_size in the model's config.pbtxt)")
    return tuple(shape)


def check_input_name(model: Runtime, name: Any) -> str:
    expected = model.inputs[0].name
    if name != expected:
        raise ServeError(f"unexpected inference input {_short(name)} for model {model.name!r}. "
                         f"Expected {expected!r}")
    return name


def _shape_str(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _short(value: Any, limit: int = 60) -> str:
    """A client's value quoted as JSON, cut short: error messages echo at most `limit` characters."""
    try:
        text = json.dumps(value[:limit] if isinstance(value, (str, list)) else value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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


# A JSON part up to this size is decoded without a look first (a batch-1 LeNet request is ~10 KB).
_UNCHECKED_JSON_BYTES = 64 * 1024
# Room for what is not the input's data: shape, names, outputs, parameters, an id.
_JSON_SLACK = 4096
_TOO_DEEP = "the inference request's JSON is nested too deeply (an input's data is at most a list per dimension)"


def _check_json_budget(model: Runtime, raw: bytes | memoryview) -> None:
    """Refuse (413) a large JSON part holding more numbers or lists than any request the model takes.

    `json.loads` holds the GIL: 16 MB of `[],` took 1.1 s to decode and would stall the event loop
    (a worker thread does not help). Counting commas and brackets is a fast scan, and a valid
    request has at most one comma per element of its largest batch and one list per row. Models
    with a dynamic dimension besides the batch have no such bound; the body limit applies.
    """
    data = raw if isinstance(raw, bytes) else bytes(raw)   # a copy only for a binary request's header
    if b"[" * 64 in data:   # 64 brackets in a row is nesting no tensor has; json.loads would say so too
        raise ServeError(_TOO_DEEP)
    shape = model.inputs[0].shape
    batch = model.max_batch_size or (shape[0] if shape and shape[0] > 0 else 0)
    rest = list(shape[1:])
    if batch <= 0 or any(d < 0 for d in rest):
        return
    elements = batch * math.prod(rest)
    lists = 1 + sum(batch * math.prod(rest[:k]) for k in range(len(rest)))   # one per row at each level
    commas = data.count(b",")
    brackets = data.count(b"[") + data.count(b"{")
    if commas > elements + _JSON_SLACK or brackets > lists + _JSON_SLACK:
        raise ServeError(f"the request's JSON holds {commas} commas and {brackets} lists or objects, more than "
                         f"any request for model {model.name!r} needs (a batch of max_batch_size {batch} has "
                         f"{elements} numbers in {lists} lists); send fewer, or send the tensor as binary data",
                         status=413)


def _load_json(raw: bytes | memoryview) -> dict[str, Any]:
    if len(raw) == 0:
        raise ServeError("empty request body: expected a JSON inference request "
                         '{"inputs": [{"name", "shape", "datatype", "data"}]}')
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # What orjson refuses and Python's json reads: NaN/Infinity tokens (json.dumps writes them) and
        # integers past 64 bits (then refused as too large for the datatype). Anything else is not JSON,
        # and the stdlib's message says where.
        try:
            header = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ServeError(f"malformed JSON in the inference request: {exc}")
        except RecursionError:
            raise ServeError(_TOO_DEEP)
    if not isinstance(header, dict):
        raise ServeError(f"the inference request must be a JSON object, got {type(header).__name__}")
    return header


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ServeError(f"'parameters' of {where} must be an object, got {_short(params)}")
    return params


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean parameter: true or false (or null/absent for the default), never "false" or 0."""
    value = params.get(key)
    if value is None:
        return default
    if type(value) is not bool:
        raise ServeError(f"parameters.{key} of {where} must be true or false, got {_short(value)}")
    return value


# Inputs may spell non-finite floats as outputs do (see the module's rule).
_NON_FINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _count_bools(value: Any, skip: Any) -> int:
    """true/false values in a parsed JSON value, not looking inside `skip` (the input's data)."""
    if value is skip:
        return 0
    if value is True or value is False:
        return 1
    if isinstance(value, dict):
        return sum(_count_bools(v, skip) for v in value.values())
    if isinstance(value, list):
        return sum(_count_bools(v, skip) for v in value)
    return 0


def _flat(data: Any) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _refuse_element(model: Runtime, name: str, data: Any, integer: bool, boolean: bool) -> None:
    """Raise a `ServeError` naming the first element of `data` the model's datatype cannot hold."""
    datatype = model.inputs[0].datatype
    where = f"'data' of input {name!r} for model {model.name!r}"
    for index, value in enumerate(_flat(data)):
        kind = type(value)
        if boolean:
            ok = kind is bool
        elif kind is str and not integer and value in _NON_FINITE_IN:
            value = _NON_FINITE_IN[value]
            ok = True
        else:
            ok = kind is int or (kind is float and not integer)
        if not ok:
            what = ("null" if value is None else "a string" if kind is str else "true/false" if kind is bool
                    else "a fraction" if kind is float else "an object" if kind is dict else kind.__name__)
            takes = ("true/false" if boolean else "integers" if integer
                     else 'numbers (or "NaN", "Infinity", "-Infinity")')
            raise ServeError(f"{where} must be a (nested) list of {takes} for datatype {datatype}; it holds "
                             f"{what} ({_short(value, 20)}) at element {index}")


def _tensor_from_json(model: Runtime, name: str, dtype: np.dtype, shape: tuple[int, ...],
                      data: Any, may_hold_bools: bool) -> np.ndarray:
    """`data` as an array of `dtype`, its JSON types checked (see the module's rule).

    numpy reads the (nested) list in one call and says what it found: an integer, float or bool
    array, or an object/str array when a null, a string or an object is inside. The one mix it
    hides is true/false among numbers (it makes them 1/0), so when the request holds more
    true/false tokens than its parameters account for (`may_hold_bools`), the elements are
    looked at one by one.
    """
    count = math.prod(shape)
    integer = dtype.kind in "iu"
    boolean = dtype.kind == "b"
    if not isinstance(data, list):
        raise ServeError(f"'data' of input {name!r} for model {model.name!r} must be a (nested) list of "
                         f"numbers for datatype {model.inputs[0].datatype}, got {_short(data)}")
    try:
        # over="raise": a finite number that only fits as infinity (1e300 or 10**300 for FP32) is
        # refused like 10**400 is, not silently turned into inf.
        with np.errstate(over="raise"):
            found = np.array(data)
            kind = found.dtype.kind
            fits = (kind == "b") if boolean else (kind in "iu" if integer else kind in "iuf")
            if not fits or may_hold_bools:
                _refuse_element(model, name, data, integer, boolean)   # raises naming the element, if any
                if not fits:   # only non-finite spellings ("NaN") made numpy see strings
                    found = np.array([_NON_FINITE_IN.get(v, v) if type(v) is str else v for v in _flat(data)])
            if integer and found.dtype.kind in "iu" and found.size:
                limits = np.iinfo(dtype)
                if found.min() < limits.min or found.max() > limits.max:
                    raise OverflowError
            array = found.astype(dtype, copy=False).reshape(-1)
    except (ValueError, TypeError, RecursionError):
        raise ServeError(f"'data' of input {name!r} for model {model.name!r} must be a (nested) list of "
                         f"numbers for datatype {model.inputs[0].datatype}")
    except (OverflowError, FloatingPointError):
        raise ServeError(f"'data' of input {name!r} for model {model.name!r} holds a number too large for "
                         f"datatype {model.inputs[0].datatype}")
    if array.size != count:
        raise ServeError(f"unexpected number of elements for input {name!r} for model {model.name!r}. "
                         f"Shape {list(shape)} needs {count}, got {array.size}")
    return array.reshape(shape)


def parse_infer(model: Runtime, body: bytes, header_length: int | None) -> InferRequest:
    """Decode a v2 infer request for `model`; raises ServeError (400) naming the problem."""
    view = memoryview(body)
    raw = view[:header_length] if header_length is not None else view
    if len(raw) > _UNCHECKED_JSON_BYTES:
        _check_json_budget(model, body if header_length is None else raw)
    header = _load_json(raw)
    binary = view[header_length:] if header_length is not None else view[:0]

    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        got = len(inputs) if isinstance(inputs, list) else _short(inputs)
        raise ServeError(f"model {model.name!r} expects 'inputs' to be a list of 1 tensor "
                         f"({model.inputs[0].name!r}), got {got}")
    tensor = inputs[0]
    name = check_input_name(model, tensor.get("name"))
    dtype = check_datatype(model, name, tensor.get("datatype"))
    shape = check_shape(model, name, tensor.get("shape"))
    size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
    if size is not None:
        needed = math.prod(shape) * dtype.itemsize
        if type(size) is not int or size < 0:
            raise ServeError(f"binary_data_size of input {name!r} must be a non-negative integer, got {_short(size)}")
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
        data = tensor["data"]
        # true/false tokens in the JSON beyond those the rest of the request holds may be in the data.
        text = body if header_length is None else bytes(raw)
        may_hold_bools = (text.count(b"true") + text.count(b"false")) > _count_bools(header, data)
        array = _tensor_from_json(model, name, dtype, shape, data, may_hold_bools)

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ServeError(f"'id' must be a string, got {_short(request_id)}")
    binary_default = _flag(_parameters(header, "the request"), "binary_data_output", False, "the request")
    return InferRequest(array=array, outputs=_requested_outputs(model, header.get("outputs"), binary_default),
                        id=None if request_id is None else str(request_id))


def _requested_outputs(model: Runtime, requested: Any, binary_default: bool) -> list[OutputRequest]:
    if requested is None:
        return [OutputRequest(meta, binary_default) for meta in model.outputs]
    if not isinstance(requested, list):
        raise ServeError(f"'outputs' must be a list of {{\"name\": ...}} objects, got {_short(requested)}")
    by_name = {meta.name: meta for meta in model.outputs}
    chosen = []
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        meta = output_named(model, by_name, name)
        params = _parameters(item, f"output {name!r}")
        classes = params.get("classification", 0)
        if type(classes) is not int or classes < 0:
            raise ServeError(f"parameters.classification of output {name!r} must be a positive integer "
                             f"(how many top classes to return), got {_short(classes)}")
        check_classification(model, meta, classes)
        chosen.append(OutputRequest(meta, _flag(params, "binary_data", binary_default, f"output {name!r}"), classes))
    return chosen


def output_named(model: Runtime, by_name: dict[str, TensorMeta], name: Any) -> TensorMeta:
    """The output a client asked for by `name` (HTTP and gRPC alike), or a 400 naming the ones there are."""
    if not isinstance(name, str) or name not in by_name:   # a list or object is not a name either
        raise ServeError(f"unexpected inference output {_short(name)} for model {model.name!r}. "
                         f"Expected one of {sorted(by_name)}")
    return by_name[name]


def check_classification(model: Runtime, meta: TensorMeta, classes: int) -> None:
    """Refuse `classes` top classes (0: no classification asked) of an output that is not [batch, classes] scores."""
    if classes and (len(meta.shape) != 2 or meta.datatype not in _SCORES):
        raise ServeError(f"output {meta.name!r} of model {model.name!r} has shape {_shape_str(meta.shape)} and "
                         f"datatype {meta.datatype}; classification needs [batch, classes] scores")


_SCORES = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


def classify(scores: np.ndarray, k: int, labels: list[str] | None) -> np.ndarray:
    """Triton's classification extension: per row, the top k as "value:index[:label]" (bytes objects)."""
    rows = scores.reshape(scores.shape[0], -1)
    k = min(k, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(order):
        for c, index in enumerate(row):
            text = f"{float(rows[r, index]):f}:{int(index)}"
            if labels and index < len(labels):
                text += f":{labels[index]}"
            out[r, c] = text.encode()
    return out


def _bytes_tensor(array: np.ndarray) -> bytes:
    """The binary tensor extension's BYTES layout: each element as a 4-byte little-endian length, then bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_values(array: np.ndarray) -> list[Any] | np.ndarray:
    """The array's elements for a JSON body; NaN and infinities as strings (see the module's rule).

    A numeric array comes back flat as itself, for orjson to write in C (`OPT_SERIALIZE_NUMPY`;
    a float32 in its shortest form that reads back to the same float32).
    """
    if array.dtype.kind in "iub" or (array.dtype.kind == "f" and np.isfinite(array).all()):
        return np.ascontiguousarray(array).ravel()
    values = array.ravel().tolist()
    if array.dtype.kind == "f":
        values = [v if math.isfinite(v) else _NON_FINITE[repr(v)] for v in values]
    elif array.dtype == object:
        values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]
    return values


class RequestParser:
    """`parse_infer` for one model, with validated binary-request headers remembered.

    A client sending binary tensors repeats the same JSON header byte for byte (same shape,
    same outputs, no id), so after the first request the header is a dictionary lookup and
    the tensor a `numpy.frombuffer` view: no JSON decoding and no re-validation.

    The plans are keyed on the header's bytes, not on a canonical form of the parsed JSON:
    a canonical key needs `json.loads` on every request, the very cost the plan saves. What a
    client can make the cache hold is bounded instead: a header over `max_key_bytes` (a real
    one is ~200 bytes; padding makes them long) is never kept, and past `capacity` entries or
    `max_bytes` of keys the oldest plans are dropped.
    """

    def __init__(self, model: Runtime, capacity: int = 256, max_key_bytes: int = 4096,
                 max_bytes: int = 256 * 1024) -> None:
        self.model = model
        self.capacity = capacity
        self.max_key_bytes = max_key_bytes
        self.max_bytes = max_bytes
        self._key_bytes = 0
        self._plans: dict[bytes, tuple[tuple[int, ...], np.dtype, int, list[OutputRequest]]] = {}

    def parse(self, body: bytes, header_length: int | None) -> InferRequest:
        if header_length is None:
            return parse_infer(self.model, body, None)
        header = body[:header_length]
        plan = self._plans.get(header)
        if plan is not None and len(body) - header_length == plan[2]:
            shape, dtype, _, outputs = plan
            return InferRequest(np.frombuffer(body, dtype, offset=header_length).reshape(shape), outputs)
        request = parse_infer(self.model, body, header_length)   # validates; raises on any mistake
        if request.id is None and len(body) > header_length and header_length <= self.max_key_bytes:
            self._remember(header, (request.array.shape, request.array.dtype, len(body) - header_length,
                                    request.outputs))
        return request

    def _remember(self, header: bytes, plan: tuple) -> None:
        if header in self._plans:
            return
        while self._plans and (len(self._plans) >= self.capacity
                               or self._key_bytes + len(header) > self.max_bytes):
            oldest = next(iter(self._plans))   # dicts keep insertion order: first in, first out
            del self._plans[oldest]
            self._key_bytes -= len(oldest)
        self._plans[header] = plan
        self._key_bytes += len(header)

    @property
    def cached_bytes(self) -> int:
        """Bytes of header keys held (bounded by `max_bytes`)."""
        return self._key_bytes


class ResponseEncoder:
    """Builds v2 infer responses for one model; JSON headers of binary answers are cached per shape.

    At batch 1 the header of a binary response never changes, so after the first request the
    answer is a dictionary lookup plus the output bytes.
    """

    def __init__(self, model: Runtime) -> None:
        self.model = model
        self._prefix = {"model_name": model.name, "model_version": model.version}
        self._cache: dict[tuple, bytes] = {}
        self._names = [o.name for o in model.outputs]
        self._labels = model.spec.labels if model.spec is not None else None

    def encode(self, request: InferRequest, results: list[np.ndarray]) -> tuple[bytes, int | None]:
        """(body, header length or None when the body is JSON only)."""
        by_name = dict(zip(self._names, results))
        chosen = [(out.meta, out.binary, by_name[out.meta.name], out.classes) for out in request.outputs]
        any_binary = any(binary for _, binary, _, _ in chosen)
        key = None
        if request.id is None and all(binary and not classes for _, binary, _, classes in chosen):
            key = tuple((meta.name, array.shape) for meta, _, array, _ in chosen)
            header = self._cache.get(key)
            if header is not None:
                return header + b"".join(array.tobytes() for _, _, array, _ in chosen), len(header)
        outputs = []
        blobs = []
        for meta, binary, array, classes in chosen:
            datatype = meta.datatype
            if classes:
                array, datatype = classify(array, classes, self._labels), "BYTES"
            entry: dict[str, Any] = {"name": meta.name, "datatype": datatype, "shape": list(array.shape)}
            if binary:
                data = _bytes_tensor(array) if classes else array.tobytes()   # C order whatever the layout
                entry["parameters"] = {"binary_data_size": len(data)}
                blobs.append(data)
            else:
                entry["data"] = json_values(array)
            outputs.append(entry)
        body: dict[str, Any] = dict(self._prefix)
        if request.id is not None:
            body["id"] = request.id
        body["outputs"] = outputs
        header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        if key is not None and len(self._cache) < 64:
            self._cache[key] = header
        if not any_binary:
            return header, None
        return header + b"".join(blobs), len(header)
