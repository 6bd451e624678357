"""`bnfold serve --grpc-port`: the Open Inference Protocol over gRPC, against a real server on 127.0.0.1.

Unmodified `tritonclient.grpc` drives the whole service; a battery of malformed requests, sent
with the raw generated stub (what a careless client could send), each gets its own non-INTERNAL
status and the words HTTP uses for the same mistake; the server keeps serving after all of them.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import pytest

from bnfold.serve.launch import free_port, running_server

grpc = pytest.importorskip("grpc")
triton_grpc = pytest.importorskip("tritonclient.grpc")
httpx = pytest.importorskip("httpx")
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc  # noqa: E402

MAX_BATCH = 8
ARGS = ["--max-body-mb", "1", "--max-batch-size", str(MAX_BATCH), "--grpc-port", "0"]


@pytest.fixture(scope="module")
def served(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory):
    """(HTTP URL, gRPC address, server pid, log path) of one server with both protocols."""
    log = tmp_path_factory.mktemp("grpc") / "serve.log"
    processes: list[subprocess.Popen] = []
    with running_server(tiny_onnx, threads=1, extra_args=ARGS, log_path=log, on_ready=processes.append) as url:
        # The gRPC server starts in the lifespan, before HTTP answers ready; port 0 is printed.
        found = re.search(r"gRPC \(inference\.GRPCInferenceService\) on 127\.0\.0\.1:(\d+)", log.read_text())
        assert found, log.read_text()[-2000:]
        yield url, f"127.0.0.1:{found.group(1)}", processes[0].pid, log


@pytest.fixture(scope="module")
def client(served):
    with triton_grpc.InferenceServerClient(served[1]) as c:
        yield c


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served[1]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(tiny_onnx: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tiny_onnx), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def _x(batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(np.float32)


def _request(x: np.ndarray | None = None, **changes) -> pb.ModelInferRequest:
    """A valid raw-contents request for the tiny model, with `changes` applied to its one input."""
    x = _x() if x is None else x
    request = pb.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    for key, value in changes.items():
        if key == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        else:
            setattr(tensor, key, value)
    request.raw_input_contents.append(x.tobytes())
    return request


def test_tritonclient_grpc_health_metadata_config_statistics_and_index(client) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "bnfold" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["name"] == "tiny" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["name"] == "tiny" and config["max_batch_size"] == MAX_BATCH
    assert config["input"][0]["data_type"] == "TYPE_FP32" and config["input"][0]["dims"] == ["1", "28", "28"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    index = client.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    before = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    x = triton_grpc.InferInput("input", [1, 1, 28, 28], "FP32")
    x.set_data_from_numpy(_x())
    client.infer("tiny", [x])
    after = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 1
    every = client.get_inference_statistics("", as_json=True)["model_stats"]
    assert [s["name"] for s in every] == ["tiny"]


def test_infer_raw_and_typed_contents_equal_in_process_onnxruntime(client, stub, reference) -> None:
    x = _x(3, seed=1)
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("tiny", [tensor], outputs=[triton_grpc.InferRequestedOutput("logits")], request_id="r7")
    assert result.get_response().id == "r7"
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), rtol=1e-5, atol=1e-6)
    # typed contents (fp32_contents), batch 1
    request = pb.ModelInferRequest(model_name="tiny", model_version="1")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28]).contents.fp32_contents.extend(
        x[:1].ravel().tolist())
    response = stub.ModelInfer(request)
    assert response.outputs[0].name == "logits" and list(response.outputs[0].shape) == [1, 10]
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, reference(x[:1]), rtol=1e-5, atol=1e-6)
    # the classification extension over gRPC: top 3 as "value:index:label"
    out = triton_grpc.InferRequestedOutput("logits", class_count=3)
    top = client.infer("tiny", [tensor], outputs=[out]).as_numpy("logits")
    assert top.shape == (3, 3)
    assert [int(item.split(b":")[1]) for item in top[0]] == list(np.argsort(-reference(x)[0])[:3])


def _two_raw() -> pb.ModelInferRequest:
    request = _request()
    request.raw_input_contents.append(b"\0" * 4)
    return request


def _typed_and_raw() -> pb.ModelInferRequest:
    request = _request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 784)
    return request


def _typed(field: str, count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    getattr(request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28]).contents,
            field).extend([1] * count)
    return request


def _no_data() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    return request


def _inputs(count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    for _ in range(count):
        request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
        request.raw_input_contents.append(_x().tobytes())
    return request


def _classes(setter: Callable[[Any], None]) -> pb.ModelInferRequest:
    request = _request()
    setter(request.outputs.add(name="logits").parameters["classification"])
    return request


def _with(request: pb.ModelInferRequest, **fields) -> pb.ModelInferRequest:
    for key, value in fields.items():
        if key == "outputs":
            request.outputs.add(name=value)
        else:
            setattr(request, key, value)
    return request


INVALID, NOT_FOUND, EXHAUSTED = "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"
MALFORMED = [
    ("wrong datatype", lambda: _request(datatype="FP64"), INVALID, "unexpected datatype FP64 for input 'input'"),
    ("unknown datatype", lambda: _request(datatype="FP33"), INVALID, 'invalid datatype "FP33"'),
    ("wrong shape", lambda: _request(shape=[1, 3, 28, 28]), INVALID, "Expected [-1,1,28,28], got [1,3,28,28]"),
    ("negative dimension", lambda: _request(shape=[-1, 1, 28, 28]), INVALID, "invalid shape [-1, 1, 28, 28]"),
    ("wrong input name", lambda: _request(name="x"), INVALID, "unexpected inference input \"x\""),
    ("raw contents of the wrong length", lambda: _request(shape=[2, 1, 28, 28]), INVALID,
     "needs 6272 bytes, got 3136"),
    ("two raw contents for one input", _two_raw, INVALID, "2 raw_input_contents for model 'tiny'"),
    ("both raw and typed contents", _typed_and_raw, INVALID, "both raw_input_contents and typed contents"),
    ("typed contents in the wrong field", lambda: _typed("int_contents", 784), INVALID,
     "its data goes in contents.fp32_contents, got contents.int_contents"),
    ("typed contents of the wrong count", lambda: _typed("fp32_contents", 5), INVALID,
     "Shape [1, 1, 28, 28] needs 784, got 5"),
    ("no data at all", _no_data, INVALID, "has neither raw_input_contents nor contents"),
    ("empty inputs", lambda: _inputs(0), INVALID, "got 0"),
    ("two inputs with the same name", lambda: _inputs(2), INVALID, "got 2"),
    ("unknown model", lambda: _with(_request(), model_name="nope"), NOT_FOUND, "unknown model 'nope'"),
    ("unknown version", lambda: _with(_request(), model_version="7"), NOT_FOUND, "unknown version '7'"),
    ("unknown output", lambda: _with(_request(), outputs="probs"), INVALID, "unexpected inference output \"probs\""),
    ("negative class count", lambda: _classes(lambda p: setattr(p, "int64_param", -3)), INVALID,
     "parameters.classification of output 'logits' must be a positive integer (how many top classes to return), "
     "got -3"),
    ("class count as a string", lambda: _classes(lambda p: setattr(p, "string_param", "3")), INVALID,
     "got a string_param"),
    ("empty batch", lambda: _request(_x(0)), INVALID, "batch size 0 of input 'input' for model 'tiny'"),
    ("batch over the limit", lambda: _request(_x(MAX_BATCH + 1)), INVALID,
     f"batch size {MAX_BATCH + 1} of input 'input' for model 'tiny' is over the limit of max_batch_size {MAX_BATCH}"),
    # 1.2 MB: over --max-body-mb 1, under grpc's own transport limit (1 MiB above): our words
    ("message over --max-body-mb", lambda: _request(_x(400), shape=[400, 1, 28, 28]), EXHAUSTED,
     "over the limit of 1048576 bytes (raise it with `bnfold serve --max-body-mb`)"),
    # 2.5 MB: refused by grpc itself, still not INTERNAL
    ("message over grpc's own limit", lambda: _request(_x(800), shape=[800, 1, 28, 28]), EXHAUSTED, "larger than max"),
]


@pytest.mark.parametrize("make, code, words", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_each_malformed_infer_gets_its_own_status_and_words(stub, make, code: str, words: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(make())
    assert caught.value.code().name == code, caught.value.details()
    assert words in caught.value.details()
    assert "\n" not in caught.value.details()


def test_bytes_that_are_no_message_and_methods_not_served_are_not_internal(served, stub) -> None:
    with grpc.insecure_channel(served[1]) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")   # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ModelInferRequest" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for call, request in [(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
                          (stub.ModelReady, pb.ModelReadyRequest(name="nope")),
                          (stub.ModelConfig, pb.ModelConfigRequest(name="tiny", version="9")),
                          (stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope"))]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_same_mistake_gets_the_same_words_over_http_and_grpc(served, stub) -> None:
    x = _x(MAX_BATCH + 1)
    header = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                          "data": x.ravel().tolist()}]}
    http = httpx.post(f"{served[0]}/v2/models/tiny/infer", json=header)
    assert http.status_code == 400
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_request(x))
    assert caught.value.details() == http.json()["error"]
    http = httpx.post(f"{served[0]}/v2/models/nope/infer", json=header)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_with(_request(), model_name="nope"))
    assert (http.status_code, caught.value.details()) == (404, http.json()["error"])


def test_the_server_keeps_serving_and_counts_grpc_in_metrics_and_access_log(served, client, reference) -> None:
    url, _, pid, log = served
    x = _x(2, seed=5)
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    before = httpx.get(f"{url}/metrics").text
    for _ in range(3):
        np.testing.assert_allclose(client.infer("tiny", [tensor]).as_numpy("logits"), reference(x), rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(triton_grpc.InferenceServerException):
        client.infer("tiny", [triton_grpc.InferInput("input", [1, 1, 28, 28], "FP64")])
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    after = httpx.get(f"{url}/metrics").text

    def count(text: str, name: str, **labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0
    assert count(after, "bnfold_requests_total", model="tiny", protocol="grpc") - \
        count(before, "bnfold_requests_total", model="tiny", protocol="grpc") == 4
    assert count(after, "bnfold_errors_total", model="tiny", protocol="grpc", status="INVALID_ARGUMENT") >= 1
    # the access log is flushed within half a second; the server's stderr is the log file
    lines = []
    for _ in range(40):
        lines = [line for line in log.read_text().splitlines() if '"method":"GRPC"' in line]
        if any('"status":400' in line for line in lines):
            break
        __import__("time").sleep(0.1)
    assert any('"path":"/inference.GRPCInferenceService/ModelInfer","status":200' in line for line in lines)
    assert any('"status":400' in line for line in lines)
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps, "serving gRPC must not load torch"


def test_a_busy_or_invalid_grpc_port_or_one_with_ray_is_a_one_line_error(tiny_onnx: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, words in [([str(port)], f"cannot listen for gRPC on 127.0.0.1:{port}"),
                            (["70000"], "--grpc-port must be between 0 and 65535, got 70000"),
                            (["0", "--ray", "auto"], "--grpc-port 0 cannot be used with --ray")]:
            done = subprocess.run([sys.executable, "-m", "bnfold.serve", str(tiny_onnx), "--port",
                                   str(free_port()), "--grpc-port", *args, "--threads", "1"],
                                  capture_output=True, text=True, timeout=120)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr[-2000:]


def test_loadtest_over_grpc_checks_every_answer(served) -> None:
    from bnfold.bench.loadtest import run_loadtest

    result = run_loadtest(served[1], "tiny", protocol="grpc", concurrency=2, requests=60, warmup=2)
    assert (result.mode, result.requests, result.errors, result.first_error) == ("grpc", 60, 0, None)
    assert result.p50_ms > 0 and result.rps > 0
    # a batch over the limit: every call is refused, and the load test says how
    refused = run_loadtest(served[1], "tiny", protocol="grpc", concurrency=1, requests=5, warmup=0,
                           inputs=_x(MAX_BATCH + 1))
    assert refused.errors == 5 and refused.first_error.startswith("gRPC INVALID_ARGUMENT: batch size 9")


# KServe's own client and server, from the kserve peer environment (bench.peers: built with pip on
# first use, a minute or two; its pins clash with ours).
_KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(address):
    async with InferenceGRPCClient(address) as client:
        health = [await client.is_server_live(), await client.is_server_ready(), await client.is_model_ready("tiny")]
        x = np.load(sys.argv[2])
        tensor = InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        answer = await client.infer(InferRequest(model_name="tiny", infer_inputs=[tensor]))
        print(json.dumps({"health": health, "name": answer.outputs[0].name,
                          "logits": answer.outputs[0].as_numpy().tolist()}))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
def test_kserve_grpc_client_unmodified_and_the_kserve_comparison_run(served, reference, tiny_onnx: Path,
                                                                     tmp_path: Path) -> None:
    import json

    from bnfold.bench.compare_kserve import compare, format_report
    from bnfold.bench.peers import peer_python

    python = peer_python("kserve")
    script, x_file = tmp_path / "client.py", tmp_path / "x.npy"
    script.write_text(_KSERVE_CLIENT)
    x = _x(2, seed=3)
    np.save(x_file, x)
    done = subprocess.run([str(python), str(script), served[1], str(x_file)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["health"] == [True, True, True] and answer["name"] == "logits"
    np.testing.assert_allclose(np.asarray(answer["logits"], np.float32), reference(x), rtol=1e-5, atol=1e-6)
    # the comparison itself, as small as it runs: every measure taken, every answer right
    report = compare(tiny_onnx, rounds=1, sequential=30, concurrent=80)
    for server in ("bnfold", "kserve"):
        figures = report["figures"][server]
        assert figures["errors"] == 0, figures
        assert all(figures[key] > 0 for key in ("http_binary_p50_ms", "http_json_p50_ms", "rps_8conn", "grpc_p50_ms"))
    assert "| gRPC (tritonclient.grpc), p50 |" in format_report(report)


def test_a_repeated_request_is_checked_from_its_plan_and_a_changed_one_again(stub, reference) -> None:
    """The parse plan is keyed on name, datatype and shape: the same kind of request with other data or
    other raw bytes is still answered right, and a wrong length after a good one is still refused."""
    for seed in (11, 12):
        x = _x(2, seed=seed)
        for _ in range(2):
            got = np.frombuffer(stub.ModelInfer(_request(x)).raw_output_contents[0], np.float32).reshape(2, 10)
            np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-6)
    short = _request(_x(2))
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(short)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "got 6268" in caught.value.details()
    both = _typed_and_raw()
    stub.ModelInfer(_request())                      # the plan for [1,1,28,28] exists now
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(both)
    assert "both raw_input_contents and typed contents" in caught.value.details()
