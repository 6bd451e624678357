"""Strict JSON types in inference requests (issue 22, item 7): a wrong type is a 400 naming the field.

`"data": [null, ...]` for FP32 used to become NaN and answer 200; `"binary_data": "false"` (a
string) was taken as true. The protocol's schema has a type for every field; only null for an
absent optional field is let through (protobuf's JSON mapping).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bnfold.serve.errors import ServeError
from bnfold.serve.launch import running_server
from bnfold.serve.protocol import ResponseEncoder, parse_infer
from bnfold.serve.runtime import ModelRuntime, open_session

httpx = pytest.importorskip("httpx")

_X = (np.arange(784, dtype=np.float32) / 100 - 3).tolist()


@pytest.fixture(scope="module")
def runtime(tiny_onnx: Path) -> ModelRuntime:
    return open_session(tiny_onnx, threads=1)


def _body(data=None, *, outputs=None, parameters=None, request_id=None, datatype="FP32") -> bytes:
    body: dict = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": datatype,
                              "data": _X if data is None else data}]}
    if outputs is not None:
        body["outputs"] = outputs
    if parameters is not None:
        body["parameters"] = parameters
    if request_id is not None:
        body["id"] = request_id
    return json.dumps(body).encode()


@pytest.mark.parametrize("body, words", [
    (_body([None] + _X[1:]), "holds null (null) at element 0"),
    (_body(_X[:5] + ["1.5"] + _X[6:]), 'holds a string ("1.5") at element 5'),
    (_body(["NaN?"] + _X[1:]), 'holds a string ("NaN?") at element 0'),
    (_body([True] * 784), "holds true/false (true) at element 0"),
    (_body(_X[:700] + [False] + _X[701:]), "holds true/false (false) at element 700"),      # hidden among numbers
    (_body(_X[:700] + [False] + _X[701:], outputs=[{"name": "logits", "parameters": {"binary_data": False}}]),
     "holds true/false (false) at element 700"),                                           # and next to a real flag
    (_body([{"v": 1}] + _X[1:]), "holds an object"),
    (_body("1,2,3"), "must be a (nested) list of numbers"),
    (_body(outputs=[{"name": "logits", "parameters": {"binary_data": "false"}}]),
     "parameters.binary_data of output 'logits' must be true or false, got \"false\""),
    (_body(outputs=[{"name": "logits", "parameters": {"binary_data": 0}}]), "must be true or false, got 0"),
    (_body(parameters={"binary_data_output": "true"}),
     "parameters.binary_data_output of the request must be true or false"),
    (_body(outputs=[{"name": "logits", "parameters": {"classification": "3"}}]),
     "parameters.classification of output 'logits' must be a positive integer"),
    (_body(outputs=[{"name": "logits", "parameters": {"classification": True}}]), "classification"),
    (_body(request_id=7), "'id' must be a string, got 7"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, "28"], "datatype": "FP32", "data": _X}]}).encode(),
     "invalid shape"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, True], "datatype": "FP32", "data": _X}]}).encode(),
     "invalid shape"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": _X,
                             "parameters": {"binary_data_size": "3136"}}]}).encode(),
     "binary_data_size of input 'input' must be a non-negative integer"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": _X,
                             "parameters": "none"}]}).encode(), "'parameters' of input 'input' must be an object"),
])
def test_a_wrong_json_type_is_a_400_naming_the_field(runtime: ModelRuntime, body: bytes, words: str) -> None:
    with pytest.raises(ServeError) as caught:
        parse_infer(runtime, body, None)
    assert caught.value.status == 400 and words in str(caught.value), str(caught.value)


def test_what_the_schema_allows_still_decodes(runtime: ModelRuntime) -> None:
    expected = np.asarray(_X, np.float32).reshape(1, 1, 28, 28)
    ints = [int(v) for v in _X]
    for body, want in [
        (_body(), expected),
        (_body(np.asarray(_X).reshape(1, 1, 28, 28).tolist()), expected),                 # nested
        (_body(ints), np.asarray(ints, np.float32).reshape(1, 1, 28, 28)),                # JSON integers for FP32
        (_body(outputs=[{"name": "logits", "parameters": {"binary_data": False, "classification": 0}}],
               parameters={"binary_data_output": True}, request_id="r1"), expected),
        (json.dumps({"id": None, "parameters": None, "inputs": [{"name": "input", "shape": [1, 1, 28, 28],
                     "datatype": "FP32", "data": _X, "parameters": None}]}).encode(), expected),   # null = absent
        (_body(["NaN", "Infinity", "-Infinity"] + _X[3:]),                                 # our output spelling
         np.asarray([np.nan, np.inf, -np.inf] + _X[3:], np.float32).reshape(1, 1, 28, 28)),
    ]:
        np.testing.assert_array_equal(parse_infer(runtime, body, None).array, want)


def test_binary_flags_are_followed_when_they_are_booleans(runtime: ModelRuntime) -> None:
    request = parse_infer(runtime, _body(outputs=[{"name": "logits", "parameters": {"binary_data": True}}]), None)
    assert request.outputs[0].binary
    request = parse_infer(runtime, _body(parameters={"binary_data_output": True},
                                         outputs=[{"name": "logits", "parameters": {"binary_data": False}}]), None)
    assert not request.outputs[0].binary


def test_json_outputs_are_written_by_orjson_and_read_back_to_the_same_float32_bits(runtime: ModelRuntime) -> None:
    request = parse_infer(runtime, _body(), None)
    result = runtime.run_all(request.array)
    body, header_length = ResponseEncoder(runtime).encode(request, result)
    assert header_length is None
    data = json.loads(body)["outputs"][0]["data"]
    assert np.array_equal(np.asarray(data, np.float32), result[0].ravel())


def test_a_real_server_answers_400_for_null_data_and_keeps_serving(tiny_onnx: Path) -> None:
    with running_server(tiny_onnx, threads=1, name="tiny") as url, httpx.Client(base_url=url) as client:
        refused = client.post("/v2/models/tiny/infer", content=_body([None] + _X[1:]))
        assert refused.status_code == 400 and "holds null" in refused.json()["error"]
        refused = client.post("/v2/models/tiny/infer",
                              content=_body(outputs=[{"name": "logits", "parameters": {"binary_data": "false"}}]))
        assert refused.status_code == 400 and "parameters.binary_data" in refused.json()["error"]
        assert client.post("/v2/models/tiny/infer", content=_body()).status_code == 200
