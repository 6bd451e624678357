"""Every manifest in deploy/ against the schemas that packages ship offline (no cluster runs here).

Core kinds (Deployment, Service, HorizontalPodAutoscaler) go through kubernetes-validate (strict:
unknown fields are errors); KServe's kinds through the KServe SDK's generated models, walked
strictly in the KServe peer environment (tests/deploy/kserve_peer.py). The cross references
between the files (the InferenceService's runtime, format and protocol) are checked here.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from bnfold.bench.peers import peer_python

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PEER_SCRIPT = Path(__file__).with_name("kserve_peer.py")
KUBERNETES_VERSION = "1.33.0"   # a Kubernetes release whose schemas kubernetes-validate ships
KSERVE_GROUP = "serving.kserve.io"


def _documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(DEPLOY.rglob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_deploy_holds_the_container_file_the_core_kinds_and_kserves_kinds():
    kinds = {doc["kind"] for _, doc in _documents()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ClusterServingRuntime",
            "InferenceService"} <= kinds
    assert "bnfold" in (DEPLOY / "Containerfile").read_text()


@pytest.mark.parametrize("path,doc", [(p, d) for p, d in _documents()
                                      if not d["apiVersion"].startswith(KSERVE_GROUP)],
                         ids=lambda v: v.name if isinstance(v, Path) else v.get("kind"))
def test_core_kinds_match_the_kubernetes_api_schema_strictly(path, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_schema_check_catches_an_unknown_field_and_a_wrong_type():
    """The check above can fail: a misspelt probe field and a string replica count are refused."""
    doc = next(d for _, d in _documents() if d["kind"] == "Deployment")
    bad = json.loads(json.dumps(doc))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    bad = json.loads(json.dumps(doc))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_probes_use_the_v2_health_routes():
    deployment = next(d for _, d in _documents() if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


@pytest.mark.slow
def test_kserve_kinds_match_the_kserve_sdk_models_strictly(tmp_path):
    python = peer_python("kserve")
    paths = [str(p) for p in sorted((DEPLOY / "kserve").glob("*.yaml"))]
    bad = tmp_path / "bad.yaml"   # the same walk must refuse a broken copy
    bad.write_text((DEPLOY / "kserve" / "inferenceservice.yaml").read_text()
                   .replace("protocolVersion: v2", "protocolVersion: v2\n      protocolVersoin: v2")
                   .replace("minReplicas: 1", "minReplicas: one"))
    result = subprocess.run([str(python), str(PEER_SCRIPT), "schema", *paths, str(bad)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    good = {k: v for k, v in report.items() if not k.startswith(str(bad))}
    assert len(good) >= 2 and all(errors == [] for errors in good.values()), good
    broken = [e for k, v in report.items() if k.startswith(str(bad)) for e in v]
    assert any("protocolVersoin" in e for e in broken) and any("minReplicas" in e for e in broken), broken


def test_the_inference_service_names_the_runtime_its_format_and_a_protocol_the_runtime_speaks():
    docs = [d for _, d in _documents()]
    runtimes = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("ClusterServingRuntime", "ServingRuntime")}
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    runtime = runtimes[model["runtime"]]["spec"]
    assert {"name": model["modelFormat"]["name"], "version": model["modelFormat"]["version"]} in \
        [{"name": f["name"], "version": f["version"]} for f in runtime["supportedModelFormats"]]
    assert model["protocolVersion"] == "v2" and {"v2", "grpc-v2"} <= set(runtime["protocolVersions"])
    container = runtime["containers"][0]
    assert container["name"] == "kserve-container"
    assert "/mnt/models" in " ".join(container["args"]) and "8080" in container["args"]
