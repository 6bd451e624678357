"""serve.protocol in-process: binary and JSON requests decode to the tensor sent, cached or not."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bnfold.serve.protocol import RequestParser, ResponseEncoder, parse_header_length, parse_infer
from bnfold.serve.runtime import ServeError, open_session

# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
hypothesis = pytest.importorskip("hypothesis")
given, settings = hypothesis.given, hypothesis.settings
st = pytest.importorskip("hypothesis.strategies")


@pytest.fixture(scope="module")
def runtime(tiny_onnx: Path):
    return open_session(tiny_onnx, threads=1, warmup=False)


def _binary(x: np.ndarray, request_id: str | None = None) -> tuple[bytes, int]:
    header = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": x.nbytes}}],
              "parameters": {"binary_data_output": True}}
    if request_id is not None:
        header["id"] = request_id
    raw = json.dumps(header).encode()
    return raw + x.tobytes(), len(raw)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 4), seed=st.integers(0, 2**16), as_json=st.booleans())
def test_requests_decode_to_the_tensor_sent(runtime, batch: int, seed: int, as_json: bool) -> None:
    x = np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    if as_json:
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        request = parse_infer(runtime, body, None)
        assert request.outputs[0][1] is False
    else:
        body, n = _binary(x)
        request = parse_infer(runtime, body, n)
        assert request.outputs[0][1] is True
    np.testing.assert_array_equal(request.array, x)


def test_cached_header_still_checks_every_body(runtime) -> None:
    parser = RequestParser(runtime)
    x1, x2 = (np.full((1, 1, 28, 28), v, np.float32) for v in (1.0, 2.0))
    body1, n = _binary(x1)
    body2, _ = _binary(x2)
    np.testing.assert_array_equal(parser.parse(body1, n).array, x1)
    np.testing.assert_array_equal(parser.parse(body2, n).array, x2)   # same header, new data: served from cache
    assert len(parser._plans) == 1
    with pytest.raises(ServeError, match="truncated binary data"):
        parser.parse(body2[:-4], n)
    with pytest.raises(ServeError, match="unexpected 4 bytes"):
        parser.parse(body2 + b"abcd", n)
    body3, n3 = _binary(x1, request_id="abc")      # requests with an id are not cached
    assert parser.parse(body3, n3).id == "abc" and len(parser._plans) == 1


def test_encoder_binary_and_json_answers(runtime) -> None:
    encoder = ResponseEncoder(runtime)
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    y = runtime.run_all(x)
    body, n = _binary(x)
    for _ in range(2):   # second time from the header cache
        payload, json_len = encoder.encode(parse_infer(runtime, body, n), y)
        header = json.loads(payload[:json_len])
        assert header["outputs"][0]["shape"] == [2, 10] and header["model_name"] == "tiny"
        np.testing.assert_array_equal(np.frombuffer(payload[json_len:], np.float32).reshape(2, 10), y[0])
    request = parse_infer(runtime, json.dumps({"id": "7", "inputs": [{"name": "input", "shape": [2, 1, 28, 28],
                                                                     "datatype": "FP32",
                                                                     "data": x.ravel().tolist()}]}).encode(), None)
    payload, json_len = encoder.encode(request, y)
    answer = json.loads(payload)
    assert json_len is None and answer["id"] == "7"
    np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"], np.float32).reshape(2, 10), y[0])


@pytest.mark.parametrize("value, size, message", [(b"x", 10, "must be an integer"), (b"11", 10, "but the body has 10"),
                                                  (b"-1", 10, "is -1")])
def test_header_length_is_checked(value: bytes, size: int, message: str) -> None:
    with pytest.raises(ServeError, match=message):
        parse_header_length(value, size)


_X = np.arange(784, dtype=np.float32).reshape(1, 1, 28, 28) / 7 - 50


@pytest.mark.parametrize("body", [
    json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": _X.ravel().tolist()}]}),
    json.dumps({"inputs": [{"data": _X.ravel().tolist(), "name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}]},
               indent=2),
    '{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":[' + ",".join(["1e-3"] * 783 + ["-2E+2"]) + "]}]}",
    # nested lists, NaN, "data" appearing elsewhere
    json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": _X.tolist()}]}),
    json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                            "data": [float("nan")] + _X.ravel().tolist()[1:]}]}),
    json.dumps({"id": "data", "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                          "data": _X.ravel().tolist()}]}),
    json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                            "parameters": {"data": [1]}, "data": _X.ravel().tolist()}]}),
])
def test_json_bodies_decode_like_json_loads(runtime, body: str) -> None:
    expected = np.asarray(json.loads(body)["inputs"][0]["data"], dtype=np.float32).reshape(1, 1, 28, 28)
    np.testing.assert_array_equal(parse_infer(runtime, body.encode(), None).array, expected)


def test_the_plan_cache_is_bounded_in_entries_and_bytes(runtime) -> None:
    """Padded or varied headers cannot make the parser hold more than its bounds (issue 12)."""
    parser = RequestParser(runtime, capacity=8, max_key_bytes=1024, max_bytes=4096)
    x = np.ones((1, 1, 28, 28), np.float32)
    body, n = _binary(x)
    for pad in range(50):                        # 50 different small headers: at most 8 kept, oldest dropped
        padded = body[:n] + b" " * pad + body[n:]
        np.testing.assert_array_equal(parser.parse(padded, n + pad).array, x)
        assert len(parser._plans) <= 8 and parser.cached_bytes <= 4096
    long_pad = body[:n] + b" " * 2000 + body[n:]   # over max_key_bytes: parsed every time, never kept
    before = dict(parser._plans)
    np.testing.assert_array_equal(parser.parse(long_pad, n + 2000).array, x)
    assert parser._plans == before
    np.testing.assert_array_equal(parser.parse(body, n).array, x)   # a plain header still gets a plan
    assert body[:n] in parser._plans
