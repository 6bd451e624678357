"""serve.repository: a Triton-layout folder is checked before it is served (names, symlinks, config.pbtxt, versions)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.models.spec import ModelSpec
from bnfold.serve.errors import ServeError
from bnfold.serve.repository import load_repository, parse_pbtxt

# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
httpx = pytest.importorskip("httpx")

CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {batch}
input [
  {{
    name: "input"
    data_type: {dtype}
    dims: [ 1, 28, 28 ]
  }}
]
output [ {{ name: "logits", data_type: TYPE_FP32, dims: [ 10 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
version_policy: {{ latest: {{ num_versions: 1 }} }}
"""


@pytest.fixture
def repo(tmp_path: Path, tiny_onnx: Path) -> Path:
    """repo/tiny/1/model.onnx (a link to the session's tiny model) with a valid config.pbtxt."""
    root = tmp_path / "repo"
    (root / "tiny" / "1").mkdir(parents=True)
    (root / "tiny" / "1" / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    (root / "tiny" / "config.pbtxt").write_text(CONFIG.format(name="tiny", batch=4, dtype="TYPE_FP32"))
    return root


def test_pbtxt_reads_what_export_writes(tmp_path: Path, tiny_onnx: Path) -> None:
    from bnfold.export import write_triton_repo

    spec = ModelSpec.from_json(next(p.value for p in onnx.load(str(tiny_onnx)).metadata_props
                                    if p.key == "bnfold.spec"))
    write_triton_repo(tiny_onnx, spec, tmp_path / "repo", name="first", max_batch_size=8)
    fields = parse_pbtxt((tmp_path / "repo/first/config.pbtxt").read_text(), tmp_path)
    assert fields["max_batch_size"] == [8] and fields["input"][0]["dims"] == [1, 28, 28]
    assert load_repository(tmp_path / "repo", threads=1)["first"].max_batch_size == 8


def test_config_max_batch_size_is_the_limit_the_service_enforces(repo: Path, in_process_service) -> None:
    x = np.zeros((5, 1, 28, 28), np.float32)
    body = {"inputs": [{"name": "input", "shape": [5, 1, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
    with in_process_service(repo, "--threads", "1") as client:
        assert client.get("/v2/models/tiny/config").json()["max_batch_size"] == 4
        r = client.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == 400 and "max_batch_size 4" in r.json()["error"]
        assert "config.pbtxt" in r.json()["error"]
        body["inputs"][0].update(shape=[4, 1, 28, 28], data=x[:4].ravel().tolist())
        assert client.post("/v2/models/tiny/infer", json=body).status_code == 200


@pytest.mark.parametrize("text, words", [
    ("max_batch_size: 4\ninput [ { name: \"input\" data_type: TYPE_FP32 dims: [1, 28, 28] }\n", "a list is not closed"),
    ("this is { not } protobuf ::", "expected ':'"),
    ("max_batch_size: \"four\"", "max_batch_size must be an integer, got 'four'"),
    (CONFIG.format(name="other", batch=4, dtype="TYPE_FP32"), "name 'other' differs from the model's folder name"),
    (CONFIG.format(name="tiny", batch=4, dtype="TYPE_INT64"), "has data_type TYPE_INT64, but the ONNX file has TYPE_FP32"),
    (CONFIG.format(name="tiny", batch=0, dtype="TYPE_FP32"), "has dims [1, 28, 28], but the ONNX file's shape is"),
    (CONFIG.format(name="tiny", batch=4, dtype="TYPE_FP32").replace('name: "input"', 'name: "image"'),
     "input 'image' is not in the ONNX file"),
    ('platform: "tensorrt_plan"', "this service runs ONNX files"),
    ("a {" * 5000 + "}" * 5000, "nested more than 32 deep"),   # was a RecursionError traceback
])
def test_a_config_pbtxt_that_disagrees_is_a_startup_error(repo: Path, text: str, words: str) -> None:
    (repo / "tiny" / "config.pbtxt").write_text(text)
    with pytest.raises(ServeError, match="config.pbtxt") as info:
        load_repository(repo, threads=1)
    assert words in str(info.value)


def test_a_bad_config_stops_bnfold_serve_with_one_line(repo: Path, capsys: pytest.CaptureFixture) -> None:
    from bnfold.cli import main

    (repo / "tiny" / "config.pbtxt").write_text("garbage ]]")
    assert main(["serve", str(repo), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnfold serve: error:") and "config.pbtxt" in err[0]


@pytest.mark.parametrize("name", ["<img src=x onerror=alert(1)>", "two\nlines", "-dash", "a b"])
def test_model_names_follow_the_export_rule(repo: Path, name: str) -> None:
    (repo / "tiny").rename(repo / name)
    (repo / name / "config.pbtxt").unlink()
    with pytest.raises(ServeError, match="invalid model name"):
        load_repository(repo, threads=1)


def test_symlinks_that_leave_the_repository_are_refused(repo: Path, tmp_path: Path, tiny_onnx: Path) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "3").mkdir(parents=True)
    (outside / "3" / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    os.symlink(outside, repo / "escape")
    with pytest.raises(ServeError, match="outside the repository"):
        load_repository(repo, threads=1)
    os.unlink(repo / "escape")
    os.symlink(outside / "3" / "model.onnx", repo / "tiny" / "1" / "model2.onnx")   # not served, not followed
    (repo / "tiny" / "2").mkdir()
    os.symlink(outside / "3" / "model.onnx", repo / "tiny" / "2" / "model.onnx")
    with pytest.raises(ServeError, match="outside the repository"):
        load_repository(repo, threads=1)
    os.unlink(repo / "tiny" / "2" / "model.onnx")
    os.symlink(repo / "tiny" / "1" / "model.onnx", repo / "tiny" / "2" / "model.onnx")   # inside: fine
    assert load_repository(repo, threads=1)["tiny"].version == "2"


def test_non_numeric_version_folders_are_skipped_with_a_log_line(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    (repo / "tiny" / "latest").mkdir()
    (repo / "tiny" / "latest" / "model.onnx").write_bytes((repo / "tiny" / "1" / "model.onnx").read_bytes())
    (repo / ".git").mkdir()
    with caplog.at_level(logging.INFO, logger="bnfold.serve"):
        models = load_repository(repo, threads=1)
    assert list(models) == ["tiny"] and models["tiny"].version == "1"
    assert any("latest" in r.getMessage() and "number" in r.getMessage() for r in caplog.records), caplog.text


def test_repository_index_lists_the_models(repo: Path, in_process_service) -> None:
    with in_process_service(repo, "--threads", "1") as client:
        index = client.post("/v2/repository/index").json()
        assert index == [{"name": "tiny", "version": "1", "state": "READY"}]
        assert json.loads(client.get("/v2").text)["extensions"] == ["binary_tensor_data", "classification",
                                                                     "statistics"]
