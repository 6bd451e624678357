"""One client must not stall, exhaust or crash the service: every limit against a real server on 127.0.0.1.

Each refusal is a 4xx `{"error": ...}` that names the limit and the `bnfold serve` option that
raises it, and a health check keeps answering within a second while the server refuses. Sizes
are bounded (a few MB on the wire) and the server runs with small limits so that each case is
quick: 8 MB bodies, 16 KB of headers, a 1 s request timeout, 24 connections.
"""
from __future__ import annotations

import gzip
import io
import json
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image


# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
httpx = pytest.importorskip("httpx")
triton_http = pytest.importorskip("tritonclient.http")

LIMITS = ["--max-body-mb", "8", "--max-header-kb", "16", "--max-headers", "50", "--request-timeout", "1",
          "--max-connections", "24", "--max-multipart-parts", "16", "--max-pending-mb", "20"]


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _binary(x: np.ndarray, pad: int = 0) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode() + b" " * pad
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _digits(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(np.float32)


class HealthProbe:
    """Health checks on another thread while a test misbehaves: the slowest answer must stay under 1 s."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self._stop.is_set() or len(self.times) < 2:   # one check before, one after at least
                start = time.perf_counter()
                try:
                    status = client.get("/v2/health/ready").status_code
                    if status != 200:
                        self.failures.append(str(status))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.times.append(time.perf_counter() - start)
                self._started.set()
                time.sleep(0.02)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        self._started.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        assert self.times and not self.failures, self.failures
        assert max(self.times) < 1.0, f"a health check waited {max(self.times):.2f} s"


def _refused(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text[:300]
    message = response.json()["error"]
    for word in words:
        assert word in message, message
    assert "0x" not in message and "Traceback" not in message
    return message


# ------------------------------------------------------------------------------- bodies


def test_a_gzip_bomb_is_refused_while_inflating_and_the_server_stays_responsive(url: str, served) -> None:
    bomb = gzip.compress(b"\0" * (128 << 20), compresslevel=9)    # 128 MB of zeros in ~130 KB
    assert len(bomb) < 1 << 20
    rss_before = _rss_mb(served[1])
    with HealthProbe(url), httpx.Client(base_url=url, timeout=10) as client:
        start = time.perf_counter()
        r = client.post("/v2/models/tiny/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        elapsed = time.perf_counter() - start
    _refused(r, 413, "inflated", "over the limit of 8388608 bytes", "--max-body-mb")
    assert elapsed < 2, elapsed
    assert _rss_mb(served[1]) - rss_before < 64       # at most the limit was ever inflated


def test_gzip_and_deflate_bodies_within_the_limit_are_served(url: str, tiny_onnx: Path) -> None:
    x = _digits(1)
    content, headers = _binary(x)
    expected = ort.InferenceSession(str(tiny_onnx)).run(None, {"input": x})[0]
    with httpx.Client(base_url=url) as client:
        for encoding, packed in (("gzip", gzip.compress(content)), ("deflate", zlib.compress(content))):
            r = client.post("/v2/models/tiny/infer", content=packed, headers={**headers, "Content-Encoding": encoding})
            assert r.status_code == 200, r.text
            n = int(r.headers["inference-header-content-length"])
            np.testing.assert_allclose(np.frombuffer(r.content[n:], np.float32).reshape(1, 10), expected, rtol=1e-6)
        truncated = gzip.compress(content)[:-30]
        _refused(client.post("/v2/models/tiny/infer", content=truncated, headers={"Content-Encoding": "gzip"}),
                 400, "gzip")


def test_multipart_of_empty_parts_is_refused_within_a_second(url: str) -> None:
    boundary = "xyz"
    empty = f"--{boundary}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\r\n".encode()
    body = empty * ((4 << 20) // len(empty)) + f"--{boundary}--\r\n".encode()       # ~4 MB of empty fields
    assert len(body) > 3 << 20
    with HealthProbe(url), httpx.Client(base_url=url, timeout=10) as client:
        start = time.perf_counter()
        r = client.post("/predictions/tiny", content=body,
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        elapsed = time.perf_counter() - start
    _refused(r, 413, "multipart body", "16 parts", "--max-multipart-parts")
    assert elapsed < 1, elapsed


def test_multipart_picks_the_file_part_not_the_first_field(url: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(28 * 28) % 255).astype(np.uint8).reshape(28, 28)).save(buffer, "PNG")
    with httpx.Client(base_url=url) as client:
        r = client.post("/predictions/tiny", data={"note": "hi"}, files={"data": ("x.png", buffer.getvalue())})
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 5


def test_gzip_members_are_joined_and_bytes_after_a_stream_are_refused(url: str, tiny_onnx: Path) -> None:
    """A gzip body of two members is one body (as gunzip reads it), not its first member alone."""
    x = _digits(5)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    expected = ort.InferenceSession(str(tiny_onnx)).run(None, {"input": x})[0]
    gz = {"Content-Encoding": "gzip"}
    with httpx.Client(base_url=url) as client:
        r = client.post("/v2/models/tiny/infer", content=gzip.compress(body[:100]) + gzip.compress(body[100:]),
                        headers=gz)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], expected.ravel(), rtol=1e-5, atol=1e-6)
        _refused(client.post("/v2/models/tiny/infer", content=gzip.compress(body) + b"junk", headers=gz),
                 400, "gzip", "does not decompress")
        _refused(client.post("/v2/models/tiny/infer", content=zlib.compress(body) + b"junk",
                             headers={"Content-Encoding": "deflate"}), 400, "4 bytes follow the end of its stream")
        members = gzip.compress(b"") * 1001 + gzip.compress(body)
        _refused(client.post("/v2/models/tiny/infer", content=members, headers=gz), 400, "more than 1000 members")


@pytest.mark.parametrize("filler", [b"[],", b"0,"], ids=["empty lists", "zeros"])
def test_megabytes_of_json_lists_are_refused_before_decoding(url: str, filler: bytes) -> None:
    """json.loads holds the GIL (7 MB of `[],` ~0.5 s, 16 MB 1.7 s of stalled loop): refused from a count first."""
    body = (b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":['
            + filler * ((7 << 20) // len(filler)) + b"0]}]}")
    with HealthProbe(url) as probe, httpx.Client(base_url=url, timeout=10) as client:
        _refused(client.post("/v2/models/tiny/infer", content=body), 413, "more than any request for model 'tiny'",
                 "max_batch_size 32")
        ok = json.dumps({"inputs": [{"name": "input", "shape": [32, 1, 28, 28], "datatype": "FP32",
                                     "data": _digits(6, batch=32).tolist()}]}, indent=1).encode()
        assert len(ok) > 64 * 1024                      # the largest batch, nested and indented, still passes
        assert client.post("/v2/models/tiny/infer", content=ok).status_code == 200
    assert max(probe.times) < 0.5, max(probe.times)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_16_bit_png_is_scaled_not_clipped(url: str) -> None:
    """A 16-bit grayscale PNG answers as the same picture at 8 bits (Pillow's convert clipped it to white)."""
    pixels = np.random.default_rng(7).integers(0, 256, (28, 28), dtype=np.uint16)
    with httpx.Client(base_url=url) as client:
        eight = client.post("/predictions/tiny", content=_png(pixels.astype(np.uint8)))
        sixteen = client.post("/predictions/tiny", content=_png(pixels * 257))
    assert eight.status_code == sixteen.status_code == 200, sixteen.text
    assert sixteen.json()["predictions"] == eight.json()["predictions"]


def test_only_raster_formats_are_opened(url: str) -> None:
    """EPS is never opened: Pillow's EPS reader runs Ghostscript on the bytes where it is installed."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"
    with httpx.Client(base_url=url) as client:
        message = _refused(client.post("/predictions/tiny", content=eps), 400, "not an image format Pillow reads")
        assert "Ghostscript" not in message
        for fmt in ("JPEG", "TIFF", "WEBP", "BMP", "GIF"):
            buffer = io.BytesIO()
            Image.new("L", (28, 28), 200).save(buffer, fmt)
            assert client.post("/predictions/tiny", content=buffer.getvalue()).status_code == 200, fmt


def test_memory_of_large_uploads_goes_back_after_them(url: str, served) -> None:
    """Decoded 25-megapixel images (100 MB each as RGBA) are freed to the OS, not kept by glibc.

    Two rounds: glibc raised its mmap threshold after the first, and kept ~420 MB from the second.
    """
    from concurrent.futures import ThreadPoolExecutor

    buffer = io.BytesIO()
    Image.new("RGBA", (5000, 5000), (1, 2, 3, 4)).save(buffer, "PNG")
    before = _rss_mb(served[1])
    with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: client.post("/predictions/tiny", content=buffer.getvalue()).status_code,
                              range(12)))
    assert codes == [200] * 12
    time.sleep(0.3)
    assert _rss_mb(served[1]) - before < 64, (before, _rss_mb(served[1]))


# ------------------------------------------------------------------------------- headers and connections


def _raw(url: str, head: bytes, *, chunk: int = 1 << 20, total: int = 0, timeout: float = 10) -> bytes:
    """Send `head` (then `total` filler bytes), read until the server closes; what came back."""
    with socket.create_connection(_address(url), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            filler = b"a" * chunk
            sent = 0
            while sent < total:
                sock.sendall(filler)
                sent += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
        except (ConnectionResetError, socket.timeout):
            pass
        return data


def test_a_64_mb_header_is_refused_with_431(url: str) -> None:
    with HealthProbe(url):
        start = time.perf_counter()
        answer = _raw(url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ", total=64 << 20)
        elapsed = time.perf_counter() - start
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    message = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert "over the limit of 16384 bytes" in message and "--max-header-kb" in message
    assert elapsed < 5, elapsed


def test_an_upgrade_request_is_answered_as_plain_http_without_log_lines(url: str, served) -> None:
    """No WebSocket routes: `Upgrade: websocket` was a 500 plus an ERROR line per request (uvicorn's)."""
    head = (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    for _ in range(3):
        answer = _raw(url, head, timeout=5)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    log = served[2].read_text(errors="replace")
    assert "handshake" not in log and "Unsupported upgrade" not in log and "WebSocket library" not in log


def test_long_unknown_names_are_echoed_cut_short(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        message = _refused(client.get("/v2/models/" + "n" * 10_000), 404, "unknown model 'nnn")
        assert len(message) < 400, len(message)
        assert len(_refused(client.get("/v2/models/tiny/versions/" + "9" * 10_000), 404, "unknown version")) < 400


def test_malformed_requests_are_json_400s_logged_at_most_once_a_second(url: str, served) -> None:
    lines_before = served[2].read_text(errors="replace").count("malformed HTTP request")
    for _ in range(200):
        answer = _raw(url, b"\x16\x03 garbage\r\n\r\n", timeout=5)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    message = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert message.startswith("malformed HTTP request"), message
    answer = _raw(url, b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", timeout=5)
    assert answer.startswith(b"HTTP/1.1 400") and b"Content-Length" in answer, answer[:300]
    time.sleep(0.2)
    log = served[2].read_text(errors="replace")
    assert log.count("malformed HTTP request") - lines_before <= 5     # was one line per request
    assert "Invalid HTTP request received" not in log


def test_too_many_header_fields_are_refused_with_431(url: str) -> None:
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(60))
    answer = _raw(url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"--max-headers" in answer
    with httpx.Client(base_url=url) as client:   # a normal request with a few headers is fine
        assert client.get("/v2/health/live", headers={f"X-{i}": "y" for i in range(20)}).status_code == 200


def test_half_open_connections_are_answered_408_and_closed_after_the_timeout(url: str, served) -> None:
    socks = []
    try:
        for i in range(20):
            sock = socket.create_connection(_address(url), timeout=5)
            sock.sendall(b"GET /v2/heal" if i % 2 else b"POST /v2/models/tiny/infer HTTP/1.1\r\nContent-Length: 99\r\n\r\n{")
            socks.append(sock)
        idle = socket.create_connection(_address(url), timeout=5)   # connects, sends nothing
        socks.append(idle)
        start = time.perf_counter()
        answers = []
        for sock in socks:
            data = b""
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
            answers.append(data)
        elapsed = time.perf_counter() - start
    finally:
        for sock in socks:
            sock.close()
    assert elapsed < 3, elapsed            # the timeout is 1 s; the sweep runs every 0.25 s
    assert all(a.startswith(b"HTTP/1.1 408") and b"--request-timeout" in a for a in answers), answers[:2]
    time.sleep(0.6)                        # the access and refusal logs are flushed at most every 0.5 s
    assert "closed a connection whose request not complete within 1 s" in served[2].read_text()


def test_connections_over_the_limit_are_answered_503(url: str, served) -> None:
    socks = [socket.create_connection(_address(url), timeout=5) for _ in range(30)]
    try:
        time.sleep(0.2)
        refused = 0
        for sock in socks:
            sock.settimeout(0.3)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            if data.startswith(b"HTTP/1.1 503") and b"--max-connections" in data:
                refused += 1
        assert refused >= 6, refused          # 24 allowed; the probe of the fixture may hold none now
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert "--max-connections" in served[2].read_text()


# ------------------------------------------------------------------------------- plan cache, batch


def test_padded_headers_do_not_grow_the_server(url: str, served) -> None:
    x = _digits(2)
    with httpx.Client(base_url=url) as client:
        for _ in range(5):
            content, headers = _binary(x)
            assert client.post("/v2/models/tiny/infer", content=content, headers=headers).status_code == 200
        before = _rss_mb(served[1])
        for i in range(20):   # each a different 2 MB header: a cache keyed on raw bytes kept them all
            content, headers = _binary(x, pad=(2 << 20) + i)
            assert client.post("/v2/models/tiny/infer", content=content, headers=headers).status_code == 200
        after = _rss_mb(served[1])
    assert after - before < 8, (before, after)


def test_batch_over_max_batch_size_is_refused_and_config_reports_it(url: str) -> None:
    with httpx.Client(base_url=url, timeout=20) as client:
        assert client.get("/v2/models/tiny/config").json()["max_batch_size"] == 32
        assert client.get("/v2/models/tiny").json()["parameters"]["max_batch_size"] == 32
        content, headers = _binary(_digits(3, batch=2000))
        _refused(client.post("/v2/models/tiny/infer", content=content, headers=headers), 400,
                 "batch size 2000", "max_batch_size 32", "--max-batch-size")
        content, headers = _binary(_digits(3, batch=32))
        assert client.post("/v2/models/tiny/infer", content=content, headers=headers).status_code == 200


def test_the_batch_decides_per_request_whether_the_model_runs_on_the_loop(tiny_onnx: Path) -> None:
    """In-process: batches up to `inline_batch` run on the event loop's thread, larger ones in a worker."""
    import asyncio

    from bnfold.serve.app import AccessLog, InferenceApp
    from bnfold.serve.runtime import INLINE_THRESHOLD_MS, open_session

    runtime = open_session(tiny_onnx, threads=1)
    assert runtime.inline_batch == int(INLINE_THRESHOLD_MS // runtime.warmup_ms) >= 1
    runtime.inline_batch = 4          # as if batch 1 took a quarter of the threshold
    seen: list[tuple[int, int]] = []
    run_all = runtime.run_all

    def recording(x: np.ndarray) -> list[np.ndarray]:
        seen.append((x.shape[0], threading.get_ident()))
        return run_all(x)

    runtime.run_all = recording       # type: ignore[method-assign]
    app = InferenceApp({"tiny": runtime}, access_log=AccessLog(enabled=False))

    async def drive() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            for batch in (1, 4, 5, 32):
                content, headers = _binary(_digits(batch, batch))
                assert (await client.post("/v2/models/tiny/infer", content=content, headers=headers)).status_code == 200
        return threading.get_ident()

    loop_thread = asyncio.run(drive())
    assert [(batch, thread == loop_thread) for batch, thread in seen] == [(1, True), (4, True), (5, False), (32, False)]


# ------------------------------------------------------------------------------- client mistakes


def _lab_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), (10, 200, 30)).convert("LAB").save(buffer, "TIFF")
    return buffer.getvalue()


MISTAKES = [
    ("integer too large for float32", "/v2/models/tiny/infer",
     b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":[1' + b"0" * 400 + b"]}]}",
     "too large for datatype FP32"),
    ("finite number that is infinite as float32", "/v2/models/tiny/infer",   # was a silent inf, 200
     b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":[1e300' + b",0" * 783 + b"]}]}",
     "too large for datatype FP32"),
    ("JSON nested 100,000 deep", "/v2/models/tiny/infer", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("output name that is a list", "/v2/models/tiny/infer",
     json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}],
                 "outputs": [{"name": ["logits"]}]}).encode(), "unexpected inference output [\"logits\"]"),
    ("output name that is an object", "/v2/models/tiny/infer",
     json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}],
                 "outputs": [{"name": {"a": 1}}]}).encode(), "unexpected inference output"),
    ("LAB-mode TIFF", "/predictions/tiny", _lab_tiff(), "cannot preprocess a 28x28 LAB image"),
    ("not an image", "/predictions/tiny", b"GIF89a but not really", "not an image format Pillow reads"),
]


@pytest.mark.parametrize("path, body, words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_client_mistakes_that_were_500s_are_400s(url: str, path: str, body: bytes, words: str) -> None:
    with httpx.Client(base_url=url) as client:
        _refused(client.post(path, content=body), 400, words)
        assert client.get("/v2/health/ready").status_code == 200


def test_nan_and_infinite_outputs_are_json_strings(url: str) -> None:
    x = _digits(4, batch=2).ravel().tolist()
    x[0] = float("nan")                  # one NaN pixel makes the first row's logits NaN
    body = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": x}]})
    with httpx.Client(base_url=url) as client:
        r = client.post("/v2/models/tiny/infer", content=body)
    assert r.status_code == 200, r.text

    def refuse(token: str) -> None:
        raise AssertionError(f"bare {token} token: not JSON")

    data = json.loads(r.text, parse_constant=refuse)["outputs"][0]["data"]
    assert data[:10] == ["NaN"] * 10 and all(isinstance(v, float) for v in data[10:])
    assert np.isnan(np.asarray(data, dtype=np.float32)[:10]).all()    # numpy reads them back


def test_classification_extension_answers_top_k_labels(url: str, tiny_onnx: Path) -> None:
    x = _digits(5, batch=2)
    logits = ort.InferenceSession(str(tiny_onnx)).run(None, {"input": x})[0]
    client = triton_http.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        for binary in (True, False):
            inp = triton_http.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = triton_http.InferRequestedOutput("logits", binary_data=binary, class_count=3)
            got = client.infer("tiny", [inp], outputs=[out]).as_numpy("logits")
            assert got.shape == (2, 3)
            for row, scores in zip(got, logits):
                fields = [item.decode().split(":") if isinstance(item, bytes) else item.split(":") for item in row]
                assert [int(f[1]) for f in fields] == list(np.argsort(-scores)[:3])
                assert [f[2] for f in fields] == [str(i) for i in np.argsort(-scores)[:3]]   # the spec's labels
                np.testing.assert_allclose([float(f[0]) for f in fields], np.sort(scores)[::-1][:3], rtol=1e-5)
    finally:
        client.close()
    with httpx.Client(base_url=url) as c:
        bad = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}],
               "outputs": [{"name": "logits", "parameters": {"classification": "three"}}]}
        _refused(c.post("/v2/models/tiny/infer", json=bad), 400, "classification")


def test_failed_requests_are_counted_apart(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        before = client.get("/v2/models/tiny/stats").json()["model_stats"][0]
        for _ in range(3):
            assert client.post("/v2/models/tiny/infer", content=b"{").status_code == 400
        content, headers = _binary(_digits(6))
        assert client.post("/v2/models/tiny/infer", content=content, headers=headers).status_code == 200
        after = client.get("/v2/models/tiny/stats").json()["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 1
    assert after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 3


def test_error_bodies_hold_no_object_reprs() -> None:
    from bnfold.serve.errors import client_text

    assert client_text("cannot identify image file <_io.BytesIO object at 0x7fb52eed1210>") == \
        "cannot identify image file <object>"


# ------------------------------------------------------------------------------- routes and methods


def test_head_is_answered_wherever_get_is(url: str) -> None:
    from bnfold.serve.app import ROUTES

    with httpx.Client(base_url=url) as client:
        for route in ROUTES:
            if "GET" not in route.methods:
                continue
            path = route.path.format(model="tiny", version="1", file="page.js")
            get, head = client.get(path), client.head(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code, get.status_code)
            assert head.content == b"" and "content-length" in head.headers
            if route.path != "/metrics":   # the metrics change between two scrapes
                assert head.headers["content-length"] == get.headers["content-length"], path


def test_every_route_is_in_openapi_and_every_documented_path_answers(url: str) -> None:
    from bnfold.serve.app import ROUTES

    with httpx.Client(base_url=url) as client:
        document = client.get("/openapi.json").json()
        for route in ROUTES:   # walk the table: each route and method is documented
            assert route.path in document["paths"], route.path
            for method in route.allowed:
                assert method.lower() in document["paths"][route.path], (route.path, method)
        for path in ("/v2/repository/index", "/v2/models/{model}/stats", "/v2/models/{model}/versions/{version}",
                     "/v2/models/{model}/versions/{version}/stats", "/v2/models/{model}/versions/{version}/config"):
            assert path in document["paths"], path
        for path, ops in document["paths"].items():   # and each documented GET answers
            concrete = path.format(model="tiny", version="1", file="index.html")
            if "get" in ops:
                assert client.get(concrete).status_code == 200, concrete
        assert client.delete("/v2/repository/index").status_code == 405
        assert client.post("/v2/repository/index").status_code == 200   # what tritonclient sends
        assert "model_repository" not in client.get("/v2").json()["extensions"]


# ------------------------------------------------------------------------------- process


def test_the_serve_process_never_imports_torch(served, tiny_onnx: Path) -> None:
    """The running server (python -m bnfold.serve) has no torch library mapped, and building the app imports none."""
    maps = Path(f"/proc/{served[1]}/maps").read_text()
    assert "libtorch" not in maps and "/torch/lib" not in maps
    code = ("import sys; from bnfold.serve.config import ServeConfig; from bnfold.serve.app import create_app; "
            "import bnfold.serve.launch, bnfold.serve.__main__, bnfold.serve.connection; "
            "app = create_app(ServeConfig(model=sys.argv[1], threads=1)); "
            "print(','.join(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_onnx)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"torch modules imported: {done.stdout[:300]}"


@pytest.mark.parametrize("args, words", [
    (["--port", "99999"], "--port must be between 0 and 65535, got 99999"),
    (["--max-body-mb", "0"], "--max-body-mb must be positive"),
    (["--request-timeout", "-1"], "--request-timeout must be positive"),
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    (["--threads", "-1"], "--threads must be"),
    # Absurd values: 1e308 MB was an OverflowError traceback, 100,000 threads hung start-up.
    (["--max-body-mb", "1e308"], "--max-body-mb must be positive and at most 4096"),
    (["--threads", "100000"], "--threads must be"),
    (["--max-pending-mb", "inf"], "--max-pending-mb must be positive and at most"),
    (["--request-timeout", "nan"], "--request-timeout must be positive and at most"),
    (["--max-decode-mpx", "0"], "--max-decode-mpx must be positive"),
])
def test_bad_serve_options_are_one_line_errors(tiny_onnx: Path, args: list[str], words: str) -> None:
    for entry in (["-m", "bnfold.cli", "serve"], ["-m", "bnfold.serve"]):
        done = subprocess.run([sys.executable, *entry, str(tiny_onnx), *args], capture_output=True, text=True,
                              timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"bnfold serve: error: {words}"), \
            done.stderr
