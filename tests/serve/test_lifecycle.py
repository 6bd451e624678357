"""Starting and stopping `bnfold serve`: clear start-up failures, SIGTERM lets in-flight requests finish,
`bnfold loadtest` drives a server; on a GPU machine the same protocol checks with --device cuda."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bnfold.serve.launch import running_server
from bnfold.serve.runtime import ServeError

# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
httpx = pytest.importorskip("httpx")
triton_http = pytest.importorskip("tritonclient.http")

CLI = [sys.executable, "-m", "bnfold.cli"]


def _wait_ready(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "server exited during start-up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("server not ready in time")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has CUDA: the refusal cannot happen here")
def test_device_cuda_without_cuda_fails_at_start_with_the_reason(tiny_onnx: Path, free_port: int) -> None:
    """The real `bnfold serve --device cuda` process exits 2 with the reason, via the launcher."""
    with pytest.raises(ServeError) as info:
        with running_server(tiny_onnx, device="cuda", port=free_port):
            pass
    message = str(info.value)
    assert "exited with code 2 before it was ready" in message
    assert "bnfold serve: error:" in message
    assert "no CUDAExecutionProvider" in message and "onnxruntime-gpu" in message
    assert "Traceback" not in message
    with socket.socket() as sock:   # nothing was left listening
        assert sock.connect_ex(("127.0.0.1", free_port)) != 0


def test_missing_model_and_busy_port_fail_clearly(tiny_onnx: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from bnfold.cli import main

    assert main(["serve", str(tmp_path / "absent.onnx")]) == 2
    assert "bnfold serve: error: no such model file or repository folder" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_onnx), "--port", str(port), "--threads", "1"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_sigterm_lets_the_request_in_flight_finish(tiny_onnx: Path, free_port: int) -> None:
    process = subprocess.Popen([*CLI, "serve", str(tiny_onnx), "--port", str(free_port), "--threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(free_port, process)
        x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        with socket.create_connection(("127.0.0.1", free_port)) as sock:
            # Half a request: the server is inside it when SIGTERM arrives.
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body[:1000])
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            sock.sendall(body[1000:])
            sock.settimeout(20)
            response = b""
            while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < 10:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        answer = json.loads(response.split(b"\r\n\r\n", 1)[1])
        expected = ort.InferenceSession(str(tiny_onnx)).run(None, {"input": x})[0]
        np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"], np.float32).reshape(1, 10),
                                   expected, rtol=1e-6, atol=1e-6)
        assert process.wait(timeout=30) == 0
        log = process.stderr.read()
        assert "Shutting down" in log and "stopped by SIGTERM" in log
        access = [json.loads(line) for line in log.splitlines() if line.startswith('{"ts"')]   # JSON lines
        assert any(e["path"] == "/v2/models/tiny/infer" and e["status"] == 200 and e["method"] == "POST"
                   and e["model"] == "tiny" and e["ms"] > 0 for e in access), access
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_loadtest_drives_the_reference_service(tiny_onnx: Path, free_port: int) -> None:
    """The comparison needs the same generator to drive the FastAPI yardstick's POST /predict."""
    from bnfold.bench.compare_reference import reference_server   # the service ships in the package
    from bnfold.bench.loadtest import run_loadtest

    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    with reference_server(tiny_onnx, free_port) as url:
        result = run_loadtest(url, None, reference=True, inputs=x, concurrency=2, requests=100)
        answer = httpx.post(f"{url}/predict", json={"data": x.ravel().tolist()}).json()["logits"]
    assert result.errors == 0 and result.requests == 100 and result.mode == "reference"
    expected = ort.InferenceSession(str(tiny_onnx)).run(None, {"input": x})[0][0]
    np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--cuda-graph"]], ids=["cuda", "cuda-graph"])
def test_cuda_server_matches_cpu(tiny_onnx: Path, extra: list[str]) -> None:
    x = np.random.default_rng(7).standard_normal((1, 1, 28, 28)).astype(np.float32)
    expected = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with running_server(tiny_onnx, device="cuda", extra_args=extra) as url:
        client = triton_http.InferenceServerClient(url=url.removeprefix("http://"))
        meta = client.get_model_metadata("tiny")
        # The server starts only when CUDAExecutionProvider is active (no silent fallback); metadata says
        # the device and nothing of the host's providers.
        assert meta["parameters"]["device"] == "cuda" and "providers" not in meta["parameters"]
        for binary in (True, False):
            inp = triton_http.InferInput("input", [1, 1, 28, 28], "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = client.infer("tiny", [inp])
            np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-3, atol=1e-4)
        from bnfold.bench.loadtest import run_loadtest
        load = run_loadtest(url, "tiny", concurrency=8, requests=400, inputs=x)
        assert load.errors == 0
        client.close()
