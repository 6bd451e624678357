"""Issue 22's probe, as regression tests against a real server on 127.0.0.1 (raw sockets where the
client must misbehave): budgets that count bytes and pixels actually held, pipelined answers before
a refusal, the request line's version and transfer codings, what metadata and pages tell a client.

Bounds are generous (seconds, hundreds of MB): the tests assert behaviour; `python -m
bnfold.bench.limits_probe` measures it.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnfold.serve.launch import running_server

httpx = pytest.importorskip("httpx")

LIMITS = ["--max-body-mb", "8", "--max-header-kb", "16", "--request-timeout", "3", "--max-pending-mb", "20",
          "--max-decode-mpx", "12"]


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _exchange(url: str, data: bytes, *, pause: float = 0.0, rest: bytes = b"", timeout: float = 5) -> bytes:
    """Send `data` (then, after `pause`, `rest`) on one connection; everything read until it closes."""
    with socket.create_connection(_address(url), timeout=timeout) as sock:
        sock.sendall(data)
        if rest:
            time.sleep(pause)
            sock.sendall(rest)
        answer = b""
        while True:
            part = sock.recv(65536)
            if not part:
                return answer
            answer += part


def _statuses(answer: bytes) -> list[int]:
    """The status of each response in `answer`, in order."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", answer)]


def _binary_body(pad: int = 0) -> tuple[bytes, int]:
    """A batch-1 binary /infer body (its JSON header padded with `pad` spaces) and its header's length."""
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode() + b" " * pad
    return header + x.tobytes(), len(header)


def _binary_request(pad: int = 0) -> bytes:
    body, header_length = _binary_body(pad)
    return (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: %d\r\n"
            b"Content-Length: %d\r\n\r\n" % (header_length, len(body)) + body)


def _log(served) -> str:
    return served[2].read_text(errors="replace")


# ------------------------------------------------------------------------------- bytes held


def test_idle_connections_declaring_large_bodies_do_not_lock_out_inference(url: str) -> None:
    """8 heads declaring 8 MB each (64 MB promised, budget 20 MB) and no body: inference still answers.

    The budget used to reserve what Content-Length promised, so every /infer got 503 until the
    request timeout closed them.
    """
    head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (8 << 20)
    idle = [socket.create_connection(_address(url), timeout=10) for _ in range(8)]
    try:
        for sock in idle:
            sock.sendall(head)
        time.sleep(0.2)
        slowest = 0.0
        body, header_length = _binary_body()
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(20):
                start = time.perf_counter()
                r = client.post("/v2/models/tiny/infer", content=body,
                                headers={"Inference-Header-Content-Length": str(header_length)})
                slowest = max(slowest, time.perf_counter() - start)
                assert r.status_code == 200, r.text
                assert client.post("/predictions/tiny", content=_png(np.zeros((28, 28), np.uint8))).status_code == 200
        assert slowest < 1.0, slowest
    finally:
        for sock in idle:
            sock.close()


def test_bytes_that_arrive_and_bytes_inflated_count_against_max_pending_mb(url: str) -> None:
    """Two bodies 7 MB in (of 7.5 declared) hold 14 of the 20 MB; a gzip body inflating to 7 MB is a 503."""
    head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (15 << 19)
    holders = [socket.create_connection(_address(url), timeout=10) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(head + b" " * (7 << 20))
        time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=10) as client:
            bomb = gzip.compress(b" " * (7 << 20))
            r = client.post("/v2/models/tiny/infer", content=bomb, headers={"Content-Encoding": "gzip"})
            assert r.status_code == 503, r.text
            assert "request bodies held at once" in r.json()["error"] and "--max-pending-mb" in r.json()["error"]
            r = client.post("/v2/models/tiny/infer", content=b" " * (7 << 20))   # received bytes too
            assert r.status_code == 503 and "--max-pending-mb" in r.text, r.text
            assert client.get("/v2/health/ready").status_code == 200
    finally:
        for sock in holders:
            sock.close()
    time.sleep(0.3)   # the server saw them leave: their bytes are given back
    with httpx.Client(base_url=url, timeout=10) as client:
        r = client.post("/v2/models/tiny/infer", content=gzip.compress(b" " * (7 << 20)),
                        headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400, r.text   # inflated in full this time, then not JSON


# ------------------------------------------------------------------------------- pipelining


PIPELINED = [
    ("health check then garbage", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03 garbage\r\n\r\n", [200, 400]),
    ("inference then garbage", _binary_request() + b"\x16\x03 garbage\r\n\r\n", [200, 400]),
    ("body longer than its Content-Length", _binary_request() + b"0000 extra bytes\r\n\r\n", [200, 400]),
    ("inference then a head over the limit", _binary_request() + b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
     [200, 431]),
    ("two requests then a version this server does not speak",
     b"GET /v2/health/live HTTP/1.1\r\n\r\n" + _binary_request() + b"GET / HTTP/2.0\r\n\r\n", [200, 200, 505]),
]


@pytest.mark.parametrize("data, expected", [c[1:] for c in PIPELINED], ids=[c[0] for c in PIPELINED])
def test_earlier_pipelined_answers_are_written_before_a_refusal(url: str, served, data: bytes,
                                                                 expected: list[int]) -> None:
    for _ in range(10):
        assert _statuses(_exchange(url, data)) == expected
    time.sleep(0.6)
    log = _log(served)
    assert "Traceback" not in log and "write_eof" not in log and "Exception in ASGI" not in log


def test_a_head_split_after_a_large_pipelined_body_is_not_a_431(url: str) -> None:
    """A 100 KB body, then the next head cut in two reads: that head is 60 bytes, under the 16 KB limit."""
    following = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = _exchange(url, _binary_request(pad=100_000) + following[:12], pause=0.3, rest=following[12:])
    assert _statuses(answer) == [200, 200], answer[-300:]


def test_a_head_over_the_limit_within_one_read_is_still_a_431(url: str) -> None:
    answer = _exchange(url, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    assert _statuses(answer) == [431] and b"--max-header-kb" in answer, answer[:300]


# ------------------------------------------------------------------------------- request line, paths, batch


RAW_MISTAKES = [
    ("no HTTP version", b"GET /v2/health/live\r\n\r\n", 400, b"no HTTP version"),
    ("HTTP/2.0 request line", b"GET /v2/health/live HTTP/2.0\r\nHost: x\r\n\r\n", 505, b"HTTP version 2.0"),
    ("gzip transfer coding", b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
     b"\r\n\r\n0\r\n\r\n", 501, b"gzip, chunked"),
    ("encoded slash in the path", b"GET /v2/models/tiny%2Fready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
     404, b"%2F"),
]


@pytest.mark.parametrize("data, status, words", [m[1:] for m in RAW_MISTAKES], ids=[m[0] for m in RAW_MISTAKES])
def test_request_lines_and_codings_this_server_does_not_speak_are_refused(url: str, data: bytes, status: int,
                                                                         words: bytes) -> None:
    answer = _exchange(url, data)
    assert _statuses(answer) == [status] and words in answer, answer[:300]
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_a_batch_of_zero_is_refused(url: str) -> None:
    body = {"inputs": [{"name": "input", "shape": [0, 1, 28, 28], "datatype": "FP32", "data": []}]}
    r = httpx.post(f"{url}/v2/models/tiny/infer", json=body)
    assert r.status_code == 400 and "batch size 0" in r.json()["error"], r.text


# ------------------------------------------------------------------------------- what clients are told


def test_model_metadata_says_nothing_of_the_host(url: str, tiny_onnx: Path) -> None:
    r = httpx.get(f"{url}/v2/models/tiny")
    assert set(r.json()["parameters"]) <= {"device", "max_batch_size", "spec", "metadata"}, r.json()["parameters"]
    assert str(tiny_onnx.parent) not in r.text and "ExecutionProvider" not in r.text and "threads" not in r.text


def test_every_html_page_has_the_same_security_headers(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        pages = [client.get(p) for p in ("/", "/docs")]
    for page in pages:
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["x-content-type-options"] == "nosniff"
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert "script-src" not in pages[1].headers["content-security-policy"]   # /docs runs no script at all


def test_static_files_carry_an_etag_and_answer_304_when_unchanged(url: str) -> None:
    with httpx.Client(base_url=url) as client:
        for path in ("/", "/static/page.js", "/static/page.css"):
            first = client.get(path)
            etag = first.headers["etag"]
            again = client.get(path, headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
            assert client.get(path, headers={"If-None-Match": '"other"'}).status_code == 200


# ------------------------------------------------------------------------------- decoding


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_larger_than_the_decode_budget_is_413_naming_the_option(url: str) -> None:
    r = httpx.post(f"{url}/predictions/tiny", content=_png(np.zeros((4000, 4000), np.uint8)), timeout=30)
    assert r.status_code == 413, r.text
    assert "16000000 pixels" in r.json()["error"] and "--max-decode-mpx" in r.json()["error"]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_big_uploads_share_the_pixel_budget_while_a_small_one_answers(url: str, served) -> None:
    """4 uploads of 8 Mpx 16-bit PNGs (16 MB each decoded) with a 12 Mpx budget: one decodes at a
    time, all answer, and a 28x28 upload meanwhile passes the waiting ones."""
    big = _png(np.full((2000, 4000), 40000, np.uint16))
    small = _png(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))
    before, peak = _rss_mb(served[1]), [0.0]
    done = threading.Event()
    small_times: list[float] = []

    def watch() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not done.is_set() and len(small_times) < 500:
                peak[0] = max(peak[0], _rss_mb(served[1]))
                start = time.perf_counter()
                assert client.post("/predictions/tiny", content=small).status_code == 200
                small_times.append(time.perf_counter() - start)
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: client.post("/predictions/tiny", content=big).status_code, range(4)))
    finally:
        done.set()
        watcher.join()
    assert codes == [200] * 4
    assert small_times and max(small_times) < 2.0, max(small_times)
    assert peak[0] - before < 200, (before, peak[0])   # all four at once, as before: ~4 x 50 MB


def test_the_decode_budget_refuses_with_503_after_waiting(tiny_onnx: Path) -> None:
    """In-process: a budget held by one image refuses a second after its wait, naming the option."""
    import asyncio

    from bnfold.serve.decoding import PixelBudget
    from bnfold.serve.errors import ServeError

    async def drive() -> tuple[int, str, int]:
        budget = PixelBudget(100, wait=0.1)
        async with budget.hold(80):
            try:
                async with budget.hold(30):
                    pass
            except ServeError as exc:
                status, message = exc.status, str(exc)
            async with budget.hold(20):   # fits beside the first
                pass
        return status, message, budget.held

    status, message, held = asyncio.run(drive())
    assert status == 503 and "--max-decode-mpx" in message and held == 0


# ------------------------------------------------------------------------------- start-up


def test_an_800_kb_config_pbtxt_parses_in_seconds() -> None:
    """Line numbers were counted from the file's start at every token: 800 KB took 46 s."""
    from bnfold.serve.repository import parse_pbtxt

    entry = 'parameters { key: "k%d" value: { string_value: "v" } }\n'
    text = 'name: "tiny"\n' + "".join(entry % i for i in range(14_000))
    assert len(text) > 800_000
    start = time.perf_counter()
    fields = parse_pbtxt(text, Path("config.pbtxt"))
    assert time.perf_counter() - start < 10
    assert len(fields["parameters"]) == 14_000
    with pytest.raises(Exception, match="line 14003: cannot read"):   # and the line of a mistake is still right
        parse_pbtxt(text + "}}\n@", Path("config.pbtxt"))


@pytest.mark.slow
def test_a_repository_with_a_large_config_and_many_empty_versions_starts_with_one_warning(
        tiny_onnx: Path, tmp_path: Path) -> None:
    model = tmp_path / "repo" / "tiny"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    for version in range(2, 20_002):
        (model / str(version)).mkdir()
    entry = 'parameters { key: "k%d" value: { string_value: "v" } }\n'
    (model / "config.pbtxt").write_text('name: "tiny"\n' + "".join(entry % i for i in range(14_000)))
    log = tmp_path / "serve.log"
    with running_server(tmp_path / "repo", threads=1, log_path=log, startup_timeout=60) as url:
        assert httpx.get(f"{url}/v2/models/tiny/ready").status_code == 200
    skipping = [line for line in log.read_text().splitlines() if "skipping" in line]
    assert len(skipping) == 1 and "20000 folder(s)" in skipping[0] and "and 19995 more" in skipping[0], skipping


@pytest.mark.parametrize("name", ["../x/<b>", "x\n"])
def test_a_single_file_name_follows_the_repository_rule(tiny_onnx: Path, name: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bnfold.serve", str(tiny_onnx), "--port", "0", "--name", name],
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "invalid model name" in lines[0], done.stderr
