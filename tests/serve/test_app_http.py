"""The real server on 127.0.0.1, driven by tritonclient (sync and aio, binary and JSON) and plain HTTP.

One server per module serves a Triton-layout repository with two models ("tiny" in versions 1
and 2, "rgb"), so every answer can be compared with a direct onnxruntime run of the same file.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bnfold.serve.launch import running_server

# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
httpx = pytest.importorskip("httpx")
triton_http = pytest.importorskip("tritonclient.http")
triton_aio = pytest.importorskip("tritonclient.http.aio")

MAX_BODY_MB = 0.05   # 52 KB: room for a JSON LeNet request, small enough to test the 413


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, make_tiny_onnx) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for name, version, seed, kwargs in [("tiny", "1", 0, {}), ("tiny", "2", 1, {}),
                                        ("rgb", "1", 2, {"in_channels": 3, "size": 32, "classes": 5})]:
        (root / name / version).mkdir(parents=True)
        make_tiny_onnx(root / name / version / "model.onnx", seed=seed, **kwargs)
    return root


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """The whole module runs on CPU, and again on CUDA where there is a GPU."""
    return request.param


@pytest.fixture(scope="module")
def server(repo: Path, device: str) -> str:
    with running_server(repo, device=device, threads=1, extra_args=["--max-body-mb", str(MAX_BODY_MB)]) as url:
        yield url


def close(got: np.ndarray, expected: np.ndarray, device: str) -> None:
    """Equal to a CPU onnxruntime run: to float32 rounding on CPU, to cuDNN's on CUDA."""
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if device == "cpu" else {"rtol": 1e-3, "atol": 1e-4}
    np.testing.assert_allclose(got, expected, **tolerance)


def direct(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def digits_like(seed: int, shape=(1, 1, 28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def binary_request(x: np.ndarray, *, name: str = "input", datatype: str = "FP32", size: int | None = None,
                   shape: list[int] | None = None, data: bytes | None = None) -> tuple[bytes, dict]:
    raw = x.tobytes() if data is None else data
    header = json.dumps({"inputs": [{"name": name, "shape": shape or list(x.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": len(x.tobytes()) if size is None else size}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def decode_binary(response: httpx.Response) -> np.ndarray:
    n = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:n])
    out = header["outputs"][0]
    assert out["parameters"]["binary_data_size"] == len(response.content) - n
    return np.frombuffer(response.content[n:], dtype=np.float32).reshape(out["shape"])


def json_request(x: np.ndarray, **overrides) -> dict:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    tensor.update(overrides)
    return {"inputs": [tensor]}


# ------------------------------------------------------------------------------------ protocol


def test_health_and_metadata(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        meta = client.get("/v2").json()
        assert meta["name"] == "bnfold" and "binary_tensor_data" in meta["extensions"]
        model = client.get("/v2/models/tiny").json()
        assert model["versions"] == ["2"] and model["platform"] == "onnxruntime_onnx"
        assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert client.get("/v2/models/rgb").json()["inputs"][0]["shape"] == [-1, 3, 32, 32]
        assert client.get("/v2/models/tiny/ready").status_code == 200
        assert client.get("/v2/models/tiny/versions/2/ready").status_code == 200
        assert client.get("/v2/models/tiny/versions/2").json()["name"] == "tiny"


def test_tritonclient_sync_binary_and_json(server: str, repo: Path, device: str) -> None:
    client = triton_http.InferenceServerClient(url=server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.get_model_metadata("rgb")["outputs"][0]["shape"] == [-1, 5]
    for binary in (True, False):
        x = digits_like(10 + binary)
        inp = triton_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton_http.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer("tiny", [inp], outputs=[out], request_id="r1")
        close(result.as_numpy("logits"), direct(repo / "tiny/2/model.onnx", x), device)
        assert result.get_response()["id"] == "r1"
    x = digits_like(12, (2, 3, 32, 32))
    inp = triton_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("rgb", [inp], request_compression_algorithm="gzip")  # every output, binary
    close(result.as_numpy("logits"), direct(repo / "rgb/1/model.onnx", x), device)
    client.close()


def test_tritonclient_aio(server: str, repo: Path, device: str) -> None:
    x = digits_like(20, (4, 1, 28, 28))

    async def run() -> np.ndarray:
        client = triton_aio.InferenceServerClient(url=server.removeprefix("http://"))
        try:
            assert await client.is_model_ready("tiny")
            inp = triton_aio.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            results = await asyncio.gather(*(client.infer("tiny", [inp]) for _ in range(4)))
            return np.stack([r.as_numpy("logits") for r in results])
        finally:
            await client.close()

    got = asyncio.run(run())
    expected = direct(repo / "tiny/2/model.onnx", x)
    for answer in got:
        close(answer, expected, device)


def test_plain_http_json_binary_and_versions(server: str, repo: Path, device: str) -> None:
    x = digits_like(30, (3, 1, 28, 28))
    expected = direct(repo / "tiny/2/model.onnx", x)
    with httpx.Client(base_url=server) as client:
        # JSON tensors, nested data, any content type (tritonclient sends none)
        body = json_request(x, data=x.tolist())
        r = client.post("/v2/models/tiny/versions/2/infer", content=json.dumps(body),
                        headers={"content-type": "text/plain"})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == [3, 10] and out["datatype"] == "FP32"
        close(np.asarray(out["data"], np.float32).reshape(3, 10), expected, device)
        content, headers = binary_request(x)
        r = client.post("/v2/models/tiny/infer", content=content, headers=headers)
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        np.testing.assert_array_equal(decode_binary(r), r2 := decode_binary(client.post(
            "/v2/models/tiny/infer", content=content, headers=headers)))
        close(r2, expected, device)
        r = client.post("/v2/models/tiny/versions/1/infer", json=json_request(x))
        assert r.status_code == 404 and "unknown version '1'" in r.json()["error"]


def _raw_exchange(server: str, head: bytes, body: bytes = b"", expect_continue: bool = False) -> bytes:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        if expect_continue:
            interim = sock.recv(65536)
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head_part, rest = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head_part).group(1))
        while len(rest) < length:
            rest += sock.recv(65536)
        return head_part + b"\r\n\r\n" + rest


def test_expect_100_continue_and_head_are_answered(server: str) -> None:
    """curl sends `Expect: 100-continue` for larger uploads; a HEAD answer has no body. Neither may hang."""
    content, headers = binary_request(digits_like(50))
    head = (f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(content)}\r\n"
            f"Inference-Header-Content-Length: {headers['Inference-Header-Content-Length']}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()
    answer = _raw_exchange(server, head, content, expect_continue=True)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    with socket.create_connection(tuple(server.removeprefix("http://").split(":")), timeout=10) as sock:
        # HEAD wherever GET works (HTTP requires it): the GET's status and length, no body.
        sock.sendall(b"HEAD /v2/models/tiny HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        head, body = answer.split(b"\r\n\r\n", 1)
        assert int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) > 100 and body == b""


# ------------------------------------------------------------------------------------ bad input

X = digits_like(40)
_OK_BIN, _OK_HEADERS = binary_request(X)
_HEADER_LEN = int(_OK_HEADERS["Inference-Header-Content-Length"])

BAD = [
    # id, method, path, request kwargs, status, expected words in the error
    ("unknown model", "POST", "/v2/models/nope/infer", {"json": json_request(X)}, 404, "unknown model 'nope'"),
    ("unknown model metadata", "GET", "/v2/models/nope", {}, 404, "unknown model 'nope'"),
    ("unknown version", "GET", "/v2/models/tiny/versions/7", {}, 404, "unknown version '7'"),
    ("wrong shape", "POST", "/v2/models/tiny/infer",
     {"json": json_request(X[0, 0, :1], shape=[1, 1, 28])}, 400,
     "unexpected shape for input 'input' for model 'tiny'. Expected [-1,1,28,28], got [1,1,28]"),
    ("wrong datatype", "POST", "/v2/models/tiny/infer", {"json": json_request(X, datatype="FP64")}, 400,
     "unexpected datatype FP64 for input 'input' for model 'tiny'. Expected FP32"),
    ("unknown datatype", "POST", "/v2/models/tiny/infer", {"json": json_request(X, datatype="FLOAT")}, 400,
     "invalid datatype"),
    ("element count", "POST", "/v2/models/tiny/infer", {"json": json_request(X, data=[0.5] * 10)}, 400,
     "Shape [1, 1, 28, 28] needs 784, got 10"),
    ("non-numeric data", "POST", "/v2/models/tiny/infer", {"json": json_request(X, data=["a"] * 784)}, 400,
     "must be a (nested) list of numbers"),
    ("wrong input name", "POST", "/v2/models/tiny/infer", {"json": json_request(X, name="image")}, 400,
     "unexpected inference input \"image\" for model 'tiny'. Expected 'input'"),
    ("two inputs", "POST", "/v2/models/tiny/infer",
     {"json": {"inputs": json_request(X)["inputs"] * 2}}, 400, "expects 'inputs' to be a list of 1 tensor"),
    ("unknown output", "POST", "/v2/models/tiny/infer",
     {"json": dict(json_request(X), outputs=[{"name": "probs"}])}, 400, "unexpected inference output \"probs\""),
    ("binary size disagrees with shape", "POST", "/v2/models/tiny/infer",
     dict(zip(("content", "headers"), binary_request(X, size=3000, data=X.tobytes()[:3000]))), 400,
     "needs 3136 bytes, got 3000"),
    ("truncated binary", "POST", "/v2/models/tiny/infer",
     {"content": _OK_BIN[:-100], "headers": _OK_HEADERS}, 400, "truncated binary data for input 'input'"),
    ("extra binary", "POST", "/v2/models/tiny/infer",
     {"content": _OK_BIN + b"junk", "headers": _OK_HEADERS}, 400, "unexpected 4 bytes of binary data"),
    ("binary without size", "POST", "/v2/models/tiny/infer",
     {"content": json.dumps(json_request(X)).encode() + b"xx",
      "headers": {"Inference-Header-Content-Length": str(len(json.dumps(json_request(X))))}}, 400,
     "no input declares parameters.binary_data_size"),
    ("header length past the body", "POST", "/v2/models/tiny/infer",
     {"content": _OK_BIN, "headers": {"Inference-Header-Content-Length": str(len(_OK_BIN) + 1)}}, 400,
     f"Inference-Header-Content-Length is {len(_OK_BIN) + 1} but the body has {len(_OK_BIN)} bytes"),
    ("header length not a number", "POST", "/v2/models/tiny/infer",
     {"content": _OK_BIN, "headers": {"Inference-Header-Content-Length": "ten"}}, 400, "must be an integer"),
    ("malformed JSON", "POST", "/v2/models/tiny/infer", {"content": b'{"inputs": [{"name": '}, 400,
     "malformed JSON in the inference request"),
    ("JSON not an object", "POST", "/v2/models/tiny/infer", {"content": b"[1, 2]"}, 400, "must be a JSON object"),
    ("empty body", "POST", "/v2/models/tiny/infer", {"content": b""}, 400, "empty request body"),
    ("body over the limit", "POST", "/v2/models/tiny/infer", {"content": b"0" * 100_000}, 413,
     "request body of 100000 bytes is over the limit"),
    ("undecodable image", "POST", "/predictions/tiny", {"content": b"\x89PNG\r\n\x1a\nnot really"}, 400,
     "cannot decode the body as an image"),
    ("empty image", "POST", "/predictions/tiny", {"content": b""}, 400, "empty request body"),
    ("bad top_k", "POST", "/predictions/tiny?top_k=abc", {"content": b"x"}, 400, "top_k must be a positive integer"),
    ("image for unknown model", "POST", "/predictions/nope", {"content": b"x"}, 404, "unknown model 'nope'"),
    ("GET on infer", "GET", "/v2/models/tiny/infer", {}, 405, "method GET not allowed"),
    ("unknown route", "GET", "/v3/whatever", {}, 404, "no route for GET /v3/whatever"),
]


@pytest.mark.parametrize("method, path, kwargs, status, words", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server: str, method: str, path: str, kwargs: dict,
                                                         status: int, words: str) -> None:
    with httpx.Client(base_url=server) as client:
        r = client.request(method, path, **kwargs)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert list(body) == ["error"] and words in body["error"], body
        assert "Traceback" not in r.text
        assert client.get("/v2/health/ready").status_code == 200
        good = client.post("/v2/models/tiny/infer", content=_OK_BIN, headers=_OK_HEADERS)
        assert good.status_code == 200


# ------------------------------------------------------------------------------------ concurrency


def test_eight_clients_two_hundred_requests_each(server: str, repo: Path, device: str) -> None:
    """Every answer equals the single-request answer for that client's own input: nothing mixes."""
    inputs = [digits_like(100 + c) for c in range(8)]
    expected = [direct(repo / "tiny/2/model.onnx", x) for x in inputs]
    failures: list[str] = []

    def client_loop(c: int) -> None:
        content, headers = binary_request(inputs[c])
        with httpx.Client(base_url=server) as client:
            single = decode_binary(client.post("/v2/models/tiny/infer", content=content, headers=headers))
            close(single, expected[c], device)
            for i in range(200):
                r = client.post("/v2/models/tiny/infer", content=content, headers=headers)
                if r.status_code != 200 or not np.array_equal(decode_binary(r), single):
                    failures.append(f"client {c} request {i}: {r.status_code} {r.content[:100]!r}")

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_loadtest_against_the_server(server: str) -> None:
    from bnfold.bench.loadtest import run_loadtest

    for binary in (True, False):
        result = run_loadtest(server, "tiny", concurrency=4, requests=200, binary=binary)
        assert result.errors == 0 and result.requests == 200, result
        assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
        assert result.rps > 0
    with pytest.raises(Exception, match="unknown model 'nope'"):
        run_loadtest(server, "nope", requests=1)


def test_loadtest_command(server: str, capsys: pytest.CaptureFixture) -> None:
    from bnfold.cli import main

    assert main(["loadtest", server, "--name", "tiny", "--requests", "300", "--concurrency", "3"]) == 0
    out = capsys.readouterr().out
    assert "binary x3: 300 requests" in out and "req/s" in out and "errors 0" in out
    assert main(["loadtest", server, "--name", "tiny", "--requests", "50", "--tensors", "json"]) == 0
    assert "json x8: 50 requests" in capsys.readouterr().out
    assert main(["loadtest", server, "--name", "nope", "--requests", "5"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_loadtest_replica_urls_spread_the_connections_over_two_servers(repo: Path, device: str, server: str,
                                                                       capsys) -> None:
    """`--replica-urls` (for the replicas Ray's direct ingress opens): connection i goes to URL i mod n,
    so two servers of the same model each answer their share; every answer is still checked."""
    from bnfold.cli import main

    def served(url: str) -> float:
        return _metric(httpx.get(f"{url}/metrics").text, "bnfold_requests_total", model="tiny", endpoint="infer")

    with running_server(repo, device=device, threads=1) as second:   # the same answers, bit for bit
        before = served(server), served(second)
        assert main(["loadtest", server, "--name", "tiny", "--requests", "200", "--concurrency", "4",
                     "--replica-urls", second]) == 0
        assert "errors 0" in capsys.readouterr().out
        first_share, second_share = served(server) - before[0], served(second) - before[1]
    # 200 timed requests split 100/100, plus warm-up and first answers on each side
    assert first_share >= 100 and second_share >= 100, (first_share, second_share)
    assert main(["loadtest", "127.0.0.1:8001", "--protocol", "grpc", "--name", "tiny",
                 "--replica-urls", second]) == 2
    assert "does not apply to --protocol grpc" in capsys.readouterr().err


def test_loadtest_without_a_name_says_which_models_the_server_has(server: str, capsys) -> None:
    # The error once pointed at GET /v2/models, a route the protocol does not have (404).
    from bnfold.cli import main

    assert main(["loadtest", server, "--requests", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--name is required" in err and "serves rgb, tiny" in err, err


def test_loadtest_at_a_port_that_does_not_speak_http_says_so_in_one_line(capsys) -> None:
    # What a gRPC port answers an HTTP/1.1 request: an HTTP/2 SETTINGS frame, which http.client
    # raised as BadStatusLine, a traceback for the user who forgot --protocol grpc.
    from bnfold.cli import main

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_in_http2() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x00\x40\x00\x00\n")

    thread = threading.Thread(target=answer_in_http2, daemon=True)
    thread.start()
    try:
        assert main(["loadtest", f"http://127.0.0.1:{port}", "--name", "tiny", "--requests", "5"]) == 2
    finally:
        thread.join(timeout=10)
        listener.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not answer in HTTP" in err and "--protocol grpc" in err, err


# ------------------------------------------------------------------------------------ operations


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_errors_and_latency(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        before = client.get("/metrics").text
        for _ in range(3):
            assert client.post("/v2/models/rgb/infer", content=b"{").status_code == 400
        content, headers = binary_request(digits_like(5, (1, 3, 32, 32)))
        assert client.post("/v2/models/rgb/infer", content=content, headers=headers).status_code == 200
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    delta = lambda name, **kw: _metric(after, name, **kw) - _metric(before, name, **kw)  # noqa: E731
    assert delta("bnfold_requests_total", model="rgb", endpoint="infer") == 4
    assert delta("bnfold_errors_total", model="rgb", endpoint="infer", status="400") == 3
    assert delta("bnfold_request_latency_seconds_count", model="rgb", endpoint="infer") == 4
    assert delta("bnfold_request_latency_seconds_bucket", model="rgb", endpoint="infer", le="+Inf") == 4
    assert "process_cpu_seconds_total" in after


def test_openapi_and_docs_pages(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        doc = client.get("/openapi.json").json()
        page = client.get("/docs")
    assert doc["openapi"].startswith("3.")
    for path in ("/v2/models/{model}/infer", "/predictions/{model}", "/v2/health/ready", "/metrics"):
        assert path in doc["paths"]
    assert doc["paths"]["/v2/models/{model}"]["get"]["parameters"][0]["schema"]["enum"] == ["rgb", "tiny"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<h1>" in html and "/v2/models/{model}/infer" in html and "Inference-Header-Content-Length" in html
    assert "<script" not in html and "http://" not in html.replace("http://127.0.0.1", "")  # offline: no CDN


def test_predictions_on_a_synthetic_model_answer_top_k(server: str) -> None:
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.fromarray((np.arange(40 * 30) % 255).astype(np.uint8).reshape(30, 40)).save(buffer, "PNG")
    with httpx.Client(base_url=server) as client:
        r = client.post("/predictions/rgb?top_k=3", content=buffer.getvalue())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "rgb" and len(body["predictions"]) == 3
        probs = [p["probability"] for p in body["predictions"]]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert {p["label"] for p in body["predictions"]} <= {str(i) for i in range(5)}
        r = client.post("/predictions/rgb?top_k=50", files={"data": ("x.png", buffer.getvalue(), "image/png")})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5     # capped at the class count
        assert abs(sum(p["probability"] for p in r.json()["predictions"]) - 1) < 1e-6


def test_a_model_is_served_under_its_key_in_the_mapping(tiny_onnx: Path) -> None:
    """In-process: a model handed to the app under another name answers there (parser, encoder, stats)."""
    from bnfold.serve.app import AccessLog, InferenceApp
    from bnfold.serve.runtime import open_session

    app = InferenceApp({"alias": open_session(tiny_onnx, threads=1)}, access_log=AccessLog(enabled=False))
    x = digits_like(60)
    content, headers = binary_request(x)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return (await client.post("/v2/models/alias/infer", content=content, headers=headers),
                    await client.get("/v2/models/alias/stats"))

    infer, stats = asyncio.run(run())
    assert infer.status_code == 200, infer.text
    close(decode_binary(infer), direct(tiny_onnx, x), "cpu")
    assert stats.status_code == 200 and stats.json()["model_stats"][0]["inference_count"] == 1
