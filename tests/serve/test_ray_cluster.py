"""`bnfold serve --ray` on a real Ray cluster: two raylets on loopback, the app deployed with 2 replicas.

One cluster for the session (`ray start --head` + `ray start --address`, each `--num-cpus 1`, in a
temporary folder and on free ports of its own), stopped whatever happens. Ray runs from its peer
environment (.peers/ray, built by bench.ray_cluster on first use: about two minutes once); the
clients here are this environment's tritonclient and onnxruntime.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http

from bnfold.bench.grpc_load import run_grpc_loadtest
from bnfold.bench.loadtest import run_loadtest
from bnfold.bench.ray_cluster import loopback_cluster, ray_python
from bnfold.serve.config import RAY_DIRECT_LINE
from bnfold.serve.launch import free_port

pytestmark = pytest.mark.slow

MODEL = "tiny"


def _replicas(cluster) -> list[dict]:
    return [a for a in cluster.state("actors")
            if str(a.get("class_name", "")).startswith("ServeReplica:bnfold") and a.get("state") == "ALIVE"]


@pytest.fixture(scope="session")
def ray_service(tiny_onnx: Path):
    """(cluster, http address, grpc address, direct URLs): bnfold's app on a 2-node loopback Ray cluster,
    2 replicas of 1 CPU, HTTP and gRPC through Ray Serve's proxy; the cluster runs Ray's direct
    ingress, so each replica also answers HTTP on a port of its own (the URLs deploy printed)."""
    python = ray_python()
    with loopback_cluster(python, nodes=2, cpus_per_node=1, env={"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}) as cluster:
        port, grpc_port = free_port(), free_port()
        deployed = subprocess.run([str(python), "-m", "bnfold.serve", str(tiny_onnx), "--ray", cluster.address,
                                   "--replicas", "2", "--replica-cpus", "1", "--port", str(port),
                                   "--grpc-port", str(grpc_port)],
                                  capture_output=True, text=True, env=cluster.env, timeout=300)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        assert "RUNNING" in deployed.stderr
        direct = [line for line in deployed.stderr.splitlines() if line.startswith(RAY_DIRECT_LINE)]
        urls = [w for w in direct[0].split() if w.startswith("http://")] if direct else []
        yield cluster, f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", urls


@pytest.fixture(scope="session")
def reference(tiny_onnx: Path):
    """In-process onnxruntime on the same file: what every answer must equal."""
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]


def _infer(client: triton_http.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    tensor = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    return client.infer(MODEL, [tensor]).as_numpy("logits")


def test_the_two_replicas_run_on_both_nodes_as_rays_state_api_reports(ray_service):
    cluster, _, _, _ = ray_service
    nodes = {n["node_id"] for n in cluster.state("nodes") if n.get("state") == "ALIVE"}
    replicas = _replicas(cluster)
    assert len(nodes) == 2
    assert len(replicas) == 2
    assert {r["node_id"] for r in replicas} == nodes


def test_tritonclient_answers_through_ray_equal_in_process_onnxruntime(ray_service, reference):
    _, url, _, _ = ray_service
    client = triton_http.InferenceServerClient(url)
    assert client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_model_metadata(MODEL)["platform"] == "onnxruntime_onnx"
    rng = np.random.default_rng(0)
    for batch in (1, 1, 3, 8):   # several requests, so both replicas answer some
        x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
        np.testing.assert_allclose(_infer(client, x), reference(x), rtol=1e-5, atol=1e-6)


def test_with_rays_direct_ingress_each_replica_answers_on_its_own_port_as_deploy_printed(ray_service, reference):
    """Ray's direct ingress (the fast path measured in bench.compare_ray): `bnfold serve --ray` names one
    URL per replica; each is a different replica process and answers what onnxruntime answers."""
    cluster, _, _, urls = ray_service
    assert len(urls) == 2 and len(set(urls)) == 2, urls
    rng = np.random.default_rng(3)
    for url in urls:
        client = triton_http.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_ready() and client.is_model_ready(MODEL)
        x = rng.standard_normal((2, 1, 28, 28), dtype=np.float32)
        np.testing.assert_allclose(_infer(client, x), reference(x), rtol=1e-5, atol=1e-6)
    # The load generator spreads its connections over the replicas (connection i to URL i mod 2)
    spread = run_loadtest(urls[0], MODEL, replicas=urls[1:], concurrency=4, requests=200, warmup=2)
    assert spread.requests == 200 and spread.errors == 0, spread.first_error
    ports = [int(url.rsplit(":", 1)[1]) for url in urls]
    owners = {_listener(port) for port in ports}
    assert owners == {int(r["pid"]) for r in _replicas(cluster)}, (owners, ports)


def _listener(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:`port` (this machine's /proc: the cluster is local)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:   # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return int(proc.name)
            except OSError:   # a process that ended, or one we may not look into
                continue
    return None


def test_tritonclient_grpc_answers_through_rays_grpc_proxy_equal_onnxruntime_and_errors_keep_their_status(
        ray_service, reference):
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    _, _, address, _ = ray_service
    client = triton_grpc.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_model_metadata(MODEL).name == MODEL
    rng = np.random.default_rng(2)
    for batch in (1, 1, 4):
        x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
        tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer(MODEL, [tensor]).as_numpy("logits")
        np.testing.assert_allclose(answer, reference(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException) as refused:   # a client's mistake: not INTERNAL
        client.get_model_metadata("no-such-model")
    assert "NOT_FOUND" in str(refused.value.status()) and "no-such-model" in refused.value.message()
    # bench.grpc_load with the `application` metadata Ray's gRPC proxy routes on when a cluster has
    # several applications (bench.compare_ray's case; with one, as here, Ray routes to it anyway)
    ours = run_grpc_loadtest(address, MODEL, concurrency=2, requests=40, warmup=1,
                             metadata=(("application", "bnfold"),))
    assert ours.requests == 40 and ours.errors == 0, ours.first_error


def test_killing_a_replica_under_load_fails_at_most_the_requests_in_flight_and_ray_replaces_it(
        ray_service, reference):
    """SIGKILL one replica's process while 4 clients send requests; count what was in flight at the kill.

    Every answer is checked against onnxruntime; a failed request is one that got an error or
    no answer. Ray must start a new replica and the service must answer again within 30 s.
    """
    cluster, url, _, _ = ray_service
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1, 1, 28, 28), dtype=np.float32) for _ in range(8)]
    expected = [reference(x) for x in inputs]
    before = _replicas(cluster)
    assert len(before) == 2
    victim = before[0]

    lock = threading.Lock()
    in_flight: set[int] = set()
    records: list[tuple[float, float, str]] = []   # (start, end, "ok" | "wrong" | "failed")
    stop = threading.Event()
    next_id = iter(range(10**9))

    def client_loop(seed: int) -> None:
        client = triton_http.InferenceServerClient(url, network_timeout=30.0, connection_timeout=30.0)
        for i in range(5000):   # bounded in count, and in time by `stop`
            if stop.is_set():
                return
            k = (seed + i) % len(inputs)
            with lock:
                rid = next(next_id)
                in_flight.add(rid)
            start = time.monotonic()
            try:
                outcome = "ok" if np.allclose(_infer(client, inputs[k]), expected[k], rtol=1e-5, atol=1e-6) \
                    else "wrong"
            except Exception:   # an HTTP error or a dropped connection: a failed request
                outcome = "failed"
                client = triton_http.InferenceServerClient(url, network_timeout=30.0, connection_timeout=30.0)
            with lock:
                in_flight.discard(rid)
                records.append((start, time.monotonic(), outcome))

    threads = [threading.Thread(target=client_loop, args=(s,), daemon=True) for s in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)   # load established on both replicas
        with lock:
            os.kill(int(victim["pid"]), signal.SIGKILL)
            killed_at = time.monotonic()
            at_kill = len(in_flight)
        replaced_at = None
        while time.monotonic() - killed_at < 30.0:
            alive = _replicas(cluster)
            if len(alive) == 2 and victim["actor_id"] not in {a["actor_id"] for a in alive}:
                replaced_at = time.monotonic()
                break
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=40)
    outcomes = [o for _, _, o in records]
    failed = outcomes.count("failed")
    after_kill_ok = [end for start, end, o in records if o == "ok" and start > killed_at]
    print(f"requests {len(records)}, in flight at the kill {at_kill}, failed {failed}, "
          f"replaced after {None if replaced_at is None else round(replaced_at - killed_at, 1)} s")
    assert outcomes.count("wrong") == 0
    assert failed <= at_kill, f"{failed} requests failed, only {at_kill} were in flight at the kill"
    assert replaced_at is not None, "Ray did not replace the killed replica within 30 s"
    assert after_kill_ok and min(after_kill_ok) - killed_at <= 30.0, "service not back within 30 s"
    assert outcomes.count("ok") > 50


def test_replicas_auto_becomes_rays_autoscaling_between_min_and_max(ray_service):
    """What `--replicas auto` asks Ray for (checked in Ray's environment, without a second deploy)."""
    cluster, _, _, _ = ray_service
    code = ("import json\nfrom bnfold.serve.config import ServeConfig\n"
            "from bnfold.serve.ray_app import deployment_options\n"
            "auto = ServeConfig(model='m.onnx', ray='x', replicas='auto', min_replicas=2, max_replicas=6, "
            "replica_cpus=0.5, max_ongoing_requests=9)\n"
            "fixed = ServeConfig(model='m.onnx', ray='x', replicas=3)\n"
            "print(json.dumps([deployment_options(auto), deployment_options(fixed)]))")
    auto, fixed = json.loads(cluster.run_python(code).strip().splitlines()[-1])
    assert auto["num_replicas"] == "auto"
    assert auto["autoscaling_config"]["min_replicas"] == 2 and auto["autoscaling_config"]["max_replicas"] == 6
    assert auto["ray_actor_options"] == {"num_cpus": 0.5} and auto["max_ongoing_requests"] == 9
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["logging_config"]["enable_access_log"] is False


@pytest.mark.parametrize("model,address,words", [
    ("missing.onnx", "127.0.0.1:1", "not found (every Ray node must see it at this path)"),
    (None, "127.0.0.1:1", "cannot reach the Ray cluster at '127.0.0.1:1'"),
])
def test_a_missing_model_or_an_unreachable_cluster_is_one_line_and_exit_2_at_once(tiny_onnx, model, address, words):
    """Ray itself would retry an unreachable address for minutes, and a missing file would fail in each replica."""
    done = subprocess.run([str(ray_python()), "-m", "bnfold.serve", model or str(tiny_onnx), "--ray", address],
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and words in lines[-1] and "Traceback" not in done.stderr, done.stderr[-2000:]
