"""serve.scheduler: Triton's dynamic batching and instance groups, in process and on a real server.

Batched answers are compared bit for bit with the same model run on each request alone: on CPU,
onnxruntime's kernels give every row the same bits at batch 16 as at batch 1 (checked for the
tiny model here, and for LeNet and resnet20 exports in the README's benchmark section).
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bnfold.serve.errors import ServeError
from bnfold.serve.launch import running_server
from bnfold.serve.repository import load_repository, parse_pbtxt, read_scheduling
from bnfold.serve.runtime import ModelRuntime, available_cpus, open_session
from bnfold.serve.scheduler import Scheduling, build_scheduler

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def runtime(tiny_onnx: Path) -> ModelRuntime:
    return open_session(tiny_onnx, threads=1, max_batch_size=64)


class Runs:
    """The scheduler's observer: every run's rows, its requests' waits, its time and its thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[int, list[float], float, str]] = []

    def __call__(self, rows: int, waits, seconds: float) -> None:
        with self.lock:
            self.items.append((rows, list(waits), seconds, threading.current_thread().name))


def _requests(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(1, 5)), 1, 28, 28)).astype(np.float32) for _ in range(count)]


def test_onnxruntime_gives_each_row_the_same_bits_at_batch_16_as_alone(runtime: ModelRuntime) -> None:
    """What makes batching invisible to clients: the premise of every bit-for-bit test below."""
    x = np.random.default_rng(1).standard_normal((16, 1, 28, 28)).astype(np.float32)
    full = runtime.run_all(x)[0]
    for k in range(16):
        assert np.array_equal(full[k:k + 1], runtime.run_all(x[k:k + 1])[0]), k


def _answer_all(scheduler, xs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Every request in `xs` sent at once; the answers in order, and the scheduler closed whatever happens."""
    async def main() -> list[list[np.ndarray]]:
        return await asyncio.gather(*(scheduler.infer(x) for x in xs))
    try:
        return asyncio.run(main())
    finally:
        scheduler.close()


def test_1000_concurrent_mixed_size_requests_are_batched_and_answered_bit_identical(runtime: ModelRuntime) -> None:
    runs = Runs()
    scheduler = build_scheduler(runtime, Scheduling(max_queue_delay_us=2000), runs)
    xs = _requests(1000)
    answers = _answer_all(scheduler, xs)
    for x, answer in zip(xs, answers):
        expected = runtime.run_all(x)
        assert len(answer) == len(expected)
        assert all(a.shape == e.shape and np.array_equal(a, e) for a, e in zip(answer, expected))
    rows = [r for r, _, _, _ in runs.items]
    assert sum(rows) == sum(len(x) for x in xs)                       # every row ran exactly once
    assert sum(len(w) for _, w, _, _ in runs.items) == 1000          # every request waited in one run
    assert max(rows) > 4 and len(rows) < 1000 / 4                     # requests were stacked ...
    assert max(rows) <= 64                                            # ... never past the max batch


def test_no_request_waits_longer_than_the_delay_plus_one_run(runtime: ModelRuntime) -> None:
    """16 clients, each sending its next request when the last is answered (at most 64 rows queued).

    The wait is measured by the scheduler (from arrival to the start of the run that served it).
    The delay is long (300 ms) so that the bound means something next to a loaded machine's
    scheduling noise, given 200 ms of slack (waiting the delay twice would still break it); each
    request's bound is the delay plus the longest run.
    """
    delay = 0.3
    runs = Runs()
    scheduler = build_scheduler(runtime, Scheduling(max_queue_delay_us=int(delay * 1e6)), runs)
    xs = _requests(16 * 3, seed=2)

    async def client(mine: list[np.ndarray]) -> None:
        for x in mine:
            await scheduler.infer(x)

    async def main() -> None:
        await asyncio.gather(*(client(xs[i::16]) for i in range(16)))
    try:
        asyncio.run(main())
    finally:
        scheduler.close()
    waits = [w for _, ws, _, _ in runs.items for w in ws]
    longest_run = max(s for _, _, s, _ in runs.items)
    assert len(waits) == 48
    assert max(waits) <= delay + longest_run + 0.2, (max(waits), longest_run)
    # and the delay is really waited for a batch that is not full (not dispatched at once)
    assert max(waits) >= delay * 0.9


def test_a_batch_leaves_as_soon_as_it_reaches_the_preferred_size(runtime: ModelRuntime) -> None:
    runs = Runs()
    scheduler = build_scheduler(runtime, Scheduling(max_queue_delay_us=5_000_000, preferred_batch_sizes=(4,)), runs)
    x = np.ones((1, 1, 28, 28), np.float32)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(scheduler.infer(x) for _ in range(8))), timeout=4)
    try:
        asyncio.run(main())   # with a 5 s delay, only the preferred size lets these finish in time
    finally:
        scheduler.close()
    assert sorted(r for r, _, _, _ in runs.items) == [4, 4]


def test_two_instances_run_side_by_side_and_answer_like_one(runtime: ModelRuntime) -> None:
    runs = Runs()
    scheduler = build_scheduler(runtime, Scheduling(instances=2), runs)
    xs = _requests(200, seed=3)
    answers = _answer_all(scheduler, xs)
    assert len(scheduler.instances) == 2 and scheduler.instances[1].session is not runtime.session
    for x, answer in zip(xs, answers):
        assert np.array_equal(answer[0], runtime.run_all(x)[0])
    assert len({thread for _, _, _, thread in runs.items}) == 2     # both sessions' workers ran requests
    assert all(rows == len(x) for (rows, _, _, _), x in zip(sorted(runs.items), sorted(xs, key=len)))


def test_a_failing_run_fails_only_its_own_requests_and_the_scheduler_keeps_serving(runtime: ModelRuntime) -> None:
    scheduler = build_scheduler(runtime, Scheduling(max_queue_delay_us=0))
    bad = np.ones((1, 1, 27, 27), np.float32)      # onnxruntime refuses the shape inside the worker
    good = np.ones((1, 1, 28, 28), np.float32)

    async def main() -> None:
        with pytest.raises(Exception):
            await scheduler.infer(bad)
        assert np.array_equal((await scheduler.infer(good))[0], runtime.run_all(good)[0])
    try:
        asyncio.run(main())
    finally:
        scheduler.close()


# ---------------------------------------------------------------------------------------------- config.pbtxt


def _scheduling(text: str) -> Scheduling:
    return read_scheduling(parse_pbtxt(text, Path("config.pbtxt")), Path("config.pbtxt"))


def test_both_blocks_are_read_from_config_pbtxt() -> None:
    read = _scheduling("""instance_group [ { count: 3 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 250 preferred_batch_size: [ 4, 8 ] }""")
    assert read == Scheduling(instances=3, kind="KIND_CPU", max_queue_delay_us=250, preferred_batch_sizes=(4, 8))
    assert _scheduling("dynamic_batching { }").max_queue_delay_us == 0          # Triton's default delay
    assert _scheduling('name: "x"') == Scheduling(kind="KIND_AUTO")            # neither: 1 instance, no batching


def test_the_default_scheduling_follows_the_device_a_session_was_opened_on(runtime: ModelRuntime) -> None:
    """A CUDA session opened directly (not from a repository) gets the default scheduling too."""
    on_gpu = dataclasses.replace(runtime, device="cuda")
    Scheduling().check(on_gpu)
    Scheduling(kind="KIND_GPU").check(on_gpu)
    with pytest.raises(ServeError, match="instance_group kind KIND_CPU does not match --device cuda"):
        Scheduling(kind="KIND_CPU").check(on_gpu)


@pytest.mark.parametrize("text, words", [
    ("instance_group [ { count: 0 kind: KIND_CPU } ]", "instance_group count must be from 1 to 64, got 0"),
    ('instance_group [ { count: "two" } ]', "instance_group count must be an integer"),
    ("instance_group [ { count: 1 kind: KIND_TPU } ]", "kind must be KIND_CPU, KIND_GPU or KIND_AUTO, got 'KIND_TPU'"),
    ("instance_group [ { count: 1 }, { count: 2 } ]", "instance_group has 2 groups"),
    ("instance_group [ { count: 1 gpus: [ 0 ] } ]", "instance_group field 'gpus' is not supported"),
    ("dynamic_batching { max_queue_delay_microseconds: -5 }", "max_queue_delay_microseconds must be from 0"),
    ("dynamic_batching { max_queue_delay_microseconds: 1.5 }", "max_queue_delay_microseconds must be an integer"),
    ("dynamic_batching { preferred_batch_size: [ 4, 0 ] }", "preferred_batch_size must be positive integers, got 0"),
    ("dynamic_batching { } dynamic_batching { }", "dynamic_batching is given 2 times"),
    ("dynamic_batching { priority_levels: 2 }", "dynamic_batching field 'priority_levels' is not supported"),
    ("dynamic_batching: 5", "dynamic_batching must be a message"),
])
def test_bad_scheduling_in_config_pbtxt_is_one_line_naming_the_field(text: str, words: str) -> None:
    with pytest.raises(ServeError) as caught:
        _scheduling(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)


_CONFIG = """max_batch_size: 8
instance_group [ {{ count: {count} kind: {kind} }} ]
{batching}
"""


def _repo(tmp_path: Path, tiny_onnx: Path, count: int = 1, kind: str = "KIND_CPU", batching: str = "") -> Path:
    root = tmp_path / "repo"
    (root / "tiny" / "1").mkdir(parents=True)
    (root / "tiny" / "1" / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    (root / "tiny" / "config.pbtxt").write_text(_CONFIG.format(count=count, kind=kind, batching=batching))
    return root


def test_a_repository_model_gets_its_config_and_options_override_it(tmp_path: Path, tiny_onnx: Path) -> None:
    root = _repo(tmp_path, tiny_onnx, count=2, batching="dynamic_batching { max_queue_delay_microseconds: 300 }")
    model = load_repository(root)["tiny"]
    assert (model.scheduling.instances, model.scheduling.max_queue_delay_us) == (2, 300)
    assert model.threads == max(1, available_cpus() // 2)     # each instance its share of the CPUs
    overridden = load_repository(root, threads=1, instances=1, dynamic_batching="off")["tiny"]
    assert (overridden.scheduling.instances, overridden.scheduling.batching) == (1, False)


@pytest.mark.parametrize("kind, batching, words", [
    ("KIND_GPU", "", "instance_group kind KIND_GPU does not match --device cpu"),
    ("KIND_CPU", "dynamic_batching { preferred_batch_size: [ 16 ] }", "preferred_batch_size [16] is over max_batch_size 8"),
])
def test_a_repository_whose_scheduling_the_model_cannot_follow_does_not_start(
        tmp_path: Path, tiny_onnx: Path, kind: str, batching: str, words: str) -> None:
    root = _repo(tmp_path, tiny_onnx, kind=kind, batching=batching)
    result = subprocess.run([sys.executable, "-m", "bnfold.serve", str(root), "--threads", "1", "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("args, words", [(["--instances", "0"], "--instances must be from 1 to 64"),
                                         (["--dynamic-batching", "soon"], "expected microseconds")])
def test_bad_scheduling_options_are_one_line_and_exit_2(tiny_onnx: Path, args: list[str], words: str) -> None:
    result = subprocess.run([sys.executable, "-m", "bnfold.serve", str(tiny_onnx), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------- real servers


def _infer(client: httpx.Client, x: np.ndarray) -> np.ndarray:
    header = (b'{"inputs":[{"name":"input","shape":%s,"datatype":"FP32","parameters":{"binary_data_size":%d}}],'
              b'"parameters":{"binary_data_output":true}}' % (str(list(x.shape)).replace(" ", "").encode(), x.nbytes))
    response = client.post("/v2/models/tiny/infer", content=header + x.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    return np.frombuffer(response.content[length:], np.float32).reshape(len(x), 10)


def _metric(text: str, name: str) -> float:
    match = re.search(rf'^{name}{{model="tiny"}} (\S+)$', text, re.M)
    assert match, name
    return float(match.group(1))


def test_dynamic_batching_on_a_real_server_answers_bit_identical_and_counts_runs(tiny_onnx: Path,
                                                                                 runtime: ModelRuntime) -> None:
    xs = _requests(160, seed=4)
    with running_server(tiny_onnx, threads=1, name="tiny",
                        extra_args=["--dynamic-batching", "3000", "--max-batch-size", "64"]) as url:
        def send(part: list[np.ndarray]) -> list[np.ndarray]:
            with httpx.Client(base_url=url, timeout=30) as client:
                return [_infer(client, x) for x in part]
        with ThreadPoolExecutor(16) as pool:
            answers = [a for part in pool.map(send, [xs[i::16] for i in range(16)]) for a in part]
        ordered = [x for i in range(16) for x in xs[i::16]]
        with httpx.Client(base_url=url) as client:
            metrics = client.get("/metrics").text
            config = client.get("/v2/models/tiny/config").json()
    for x, answer in zip(ordered, answers):
        assert np.array_equal(answer, runtime.run_all(x)[0])
    # the histogram of rows per run: its sum is every row sent, its count the runs (fewer than requests)
    assert _metric(metrics, "bnfold_batch_size_sum") == sum(len(x) for x in xs)
    runs = _metric(metrics, "bnfold_batch_size_count")
    assert 0 < runs < len(xs)
    assert _metric(metrics, "bnfold_queue_seconds_count") == len(xs)
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 3000


def test_two_instances_serve_concurrent_requests_correctly(tiny_onnx: Path, runtime: ModelRuntime) -> None:
    xs = _requests(120, seed=5)
    with running_server(tiny_onnx, threads=1, name="tiny", extra_args=["--instances", "2"]) as url:
        def send(part: list[np.ndarray]) -> list[np.ndarray]:
            with httpx.Client(base_url=url, timeout=30) as client:
                return [_infer(client, x) for x in part]
        with ThreadPoolExecutor(8) as pool:
            answers = [a for part in pool.map(send, [xs[i::8] for i in range(8)]) for a in part]
        with httpx.Client(base_url=url) as client:
            config = client.get("/v2/models/tiny/config").json()
            metrics = client.get("/metrics").text
    ordered = [x for i in range(8) for x in xs[i::8]]
    for x, answer in zip(ordered, answers):
        assert np.array_equal(answer, runtime.run_all(x)[0])
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert "dynamic_batching" not in config
    assert _metric(metrics, "bnfold_batch_size_count") == len(xs)   # one run per request without batching


def test_grpc_and_http_requests_share_batches_and_answer_bit_identical(tiny_onnx: Path, runtime: ModelRuntime,
                                                                       tmp_path: Path) -> None:
    """The batcher sits below both protocols: ModelInfer calls and /infer posts are stacked together."""
    triton_grpc = pytest.importorskip("tritonclient.grpc")
    log = tmp_path / "serve.log"
    xs = _requests(96, seed=6)
    with running_server(tiny_onnx, threads=1, name="tiny", log_path=log,
                        extra_args=["--dynamic-batching", "3000", "--max-batch-size", "64", "--grpc-port", "0"]) as url:
        found = re.search(r"gRPC \(inference\.GRPCInferenceService\) on 127\.0\.0\.1:(\d+)", log.read_text())
        assert found, log.read_text()[-2000:]

        def over_grpc(part: list[np.ndarray]) -> list[np.ndarray]:
            with triton_grpc.InferenceServerClient(f"127.0.0.1:{found.group(1)}") as client:
                answers = []
                for x in part:
                    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
                    tensor.set_data_from_numpy(x)
                    answers.append(client.infer("tiny", [tensor]).as_numpy("logits"))
                return answers

        def over_http(part: list[np.ndarray]) -> list[np.ndarray]:
            with httpx.Client(base_url=url, timeout=30) as client:
                return [_infer(client, x) for x in part]
        parts = [xs[i::12] for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(over_grpc if i % 2 else over_http, part) for i, part in enumerate(parts)]
            answers = [a for future in futures for a in future.result()]
        with httpx.Client(base_url=url) as client:
            metrics = client.get("/metrics").text
    for x, answer in zip([x for part in parts for x in part], answers):
        assert np.array_equal(answer, runtime.run_all(x)[0])
    assert _metric(metrics, "bnfold_batch_size_sum") == sum(len(x) for x in xs)
    assert _metric(metrics, "bnfold_queue_seconds_count") == len(xs)
    assert _metric(metrics, "bnfold_batch_size_count") < len(xs)
