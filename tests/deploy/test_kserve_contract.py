"""The KServe runtime's contract, without a cluster: its container's exact command, run here.

KServe starts `kserve-container` of deploy/kserve/servingruntime.yaml with the InferenceService's
name in place of {{.Name}}, after its storage initializer has copied the storageUri to
/mnt/models. This test does the same with the command and arguments read from the manifest,
changing only what a shared test machine must: /mnt/models is a temporary folder laid out the
same way (the folder's contents at its root: model.onnx), ports 8080/8081 are free ports, and
`bnfold` is this environment's. KServe's own Python clients (InferenceRESTClient and
InferenceGRPCClient, from the KServe peer environment) then check health, metadata and
inference, and the answers must equal onnxruntime's on the same file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from bnfold.bench.peers import peer_python
from bnfold.serve.launch import free_port, server_process

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kserve"
PEER_SCRIPT = Path(__file__).with_name("kserve_peer.py")

pytestmark = pytest.mark.slow


def _runtime_command(mnt: Path, http_port: int, grpc_port: int) -> tuple[list[str], str]:
    """The runtime container's command + args as KServe would run them for our InferenceService."""
    runtime = yaml.safe_load((DEPLOY / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((DEPLOY / "inferenceservice.yaml").read_text())
    name = isvc["metadata"]["name"]
    container = runtime["spec"]["containers"][0]
    command = [*container.get("command", []), *container.get("args", [])]
    swaps = {"{{.Name}}": name, "/mnt/models": str(mnt), "8080": str(http_port), "8081": str(grpc_port)}
    rendered = []
    for part in command:
        for old, new in swaps.items():
            part = part.replace(old, new)
        rendered.append(part)
    assert rendered[0] == "bnfold"
    rendered[0] = str(Path(sys.executable).with_name("bnfold"))
    return rendered, name


def test_the_kserve_runtime_command_answers_kserves_rest_and_grpc_clients(tiny_onnx, tmp_path):
    python = peer_python("kserve")
    mnt = tmp_path / "mnt" / "models"   # what the storage initializer leaves: the storageUri's contents
    mnt.mkdir(parents=True)
    shutil.copy(tiny_onnx, mnt / "model.onnx")
    http_port, grpc_port = free_port(), free_port()
    command, name = _runtime_command(mnt, http_port, grpc_port)
    assert "--grpc-port" in command and "--host" in command
    # what the kserve-container sees besides its arguments (Knative's variables in serverless mode)
    env = {"K_SERVICE": f"{name}-predictor", "K_CONFIGURATION": f"{name}-predictor",
           "K_REVISION": f"{name}-predictor-00001"}
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28), dtype=np.float32)
    session = ort.InferenceSession(str(mnt / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    request = tmp_path / "request.json"
    with server_process(command, http_port, env=env) as url:
        request.write_text(json.dumps({"http": url, "grpc": f"127.0.0.1:{grpc_port}", "model": name,
                                       "input_name": session.get_inputs()[0].name, "input": x.tolist()}))
        result = subprocess.run([str(python), str(PEER_SCRIPT), "client", str(request)],
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout)
    assert answers["rest_live"] and answers["rest_ready"] and answers["rest_model_ready"]
    assert answers["grpc_live"] and answers["grpc_ready"] and answers["grpc_model_ready"]
    meta = answers["metadata"]
    assert meta["name"] == name and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0]["name"] == session.get_inputs()[0].name
    assert answers["rest_output_name"] == session.get_outputs()[0].name
    np.testing.assert_allclose(np.asarray(answers["rest_output"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(answers["grpc_output"], dtype=np.float32), expected, rtol=1e-5, atol=1e-6)
