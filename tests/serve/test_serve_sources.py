"""`bnfold serve A B ...`: ONNX files, an export folder and NAME=PATH, named from each file's spec or name."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bnfold.serve.errors import ServeError
from bnfold.serve.launch import running_server
from bnfold.serve.repository import file_model_name, load_models

httpx = pytest.importorskip("httpx")


@pytest.fixture
def export_folder(tmp_path: Path, tiny_onnx: Path) -> Path:
    """What `bnfold export --out DIR` leaves: model.onnx, model.int8.onnx beside a TorchScript file and export.json."""
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("model.onnx", "model.int8.onnx"):
        (folder / name).write_bytes(tiny_onnx.read_bytes())
    (folder / "model.ts").write_bytes(b"PK\x03\x04 not served")
    (folder / "export.json").write_text("{}")
    return folder


def test_names_come_from_the_spec_and_keep_the_variant_of_the_file_name() -> None:
    assert file_model_name(Path("x/model.onnx"), "lenet") == "lenet"
    assert file_model_name(Path("x/model.int8.onnx"), "lenet") == "lenet.int8"
    assert file_model_name(Path("resnet18-v2.7.onnx"), None) == "resnet18-v2.7"   # no spec: the file stem
    assert file_model_name(Path("model.onnx"), "timm:resnet18") == "timm_resnet18"


def test_an_export_folder_serves_each_onnx_file_and_skips_the_rest(export_folder: Path) -> None:
    models = load_models(export_folder, threads=1)
    assert sorted(models) == ["tiny", "tiny.int8"]
    assert models["tiny.int8"].path.name == "model.int8.onnx"


def test_two_files_with_one_name_are_refused_naming_both(tmp_path: Path, tiny_onnx: Path) -> None:
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / "model.onnx"
    other.write_bytes(tiny_onnx.read_bytes())
    with pytest.raises(ServeError, match=r"two models would both be served as 'tiny': .*model.onnx and "
                                         r".*b/model.onnx; give one another name with NAME=PATH"):
        load_models([tiny_onnx, other], threads=1)
    assert sorted(load_models([tiny_onnx, f"second={other}"], threads=1)) == ["second", "tiny"]


def test_a_file_given_twice_is_said_so(export_folder: Path) -> None:
    with pytest.raises(ServeError, match=r"model.onnx is given twice \(as 'tiny'\); name each file once"):
        load_models([export_folder, export_folder / "model.onnx"], threads=1)


def test_an_export_folder_without_onnx_says_how_to_get_one(tmp_path: Path) -> None:
    (tmp_path / "model.ts").write_bytes(b"PK\x03\x04")
    (tmp_path / "model.pt2").write_bytes(b"PK\x03\x04")
    with pytest.raises(ServeError, match=r"holds no ONNX file, only model.pt2, model.ts; `bnfold serve` runs ONNX: "
                                         r"`bnfold export MODEL --format onnx --out DIR` writes one"):
        load_models(tmp_path, threads=1)


def test_a_pipeline_folder_points_at_its_export_folder(tmp_path: Path, export_folder: Path) -> None:
    (tmp_path / "train").mkdir()   # export_folder is tmp_path/export: the layout `bnfold pipeline --out` writes
    with pytest.raises(ServeError, match=rf"{tmp_path} holds no ONNX file itself; {export_folder} does: "
                                         rf"serve {export_folder}"):
        load_models(tmp_path, threads=1)


def test_name_with_several_sources_is_refused(tmp_path: Path, tiny_onnx: Path) -> None:
    with pytest.raises(ServeError, match="--name applies to a single model file; for several, give each as NAME=PATH"):
        load_models([tiny_onnx, f"b={tiny_onnx}"], name="x", threads=1)


def test_the_server_answers_for_an_export_folder_and_a_second_file(export_folder: Path, make_tiny_onnx,
                                                                  tmp_path: Path) -> None:
    extra = make_tiny_onnx(tmp_path / "digits.onnx", seed=1)
    # `tiny` twice (the folder's model.onnx and digits.onnx both carry arch tiny): named apart with NAME=PATH.
    with running_server([export_folder, f"digits={extra}"], threads=1) as url, httpx.Client(base_url=url) as client:
        index = client.post("/v2/repository/index").json()
        assert sorted(m["name"] for m in index) == ["digits", "tiny", "tiny.int8"]
        for name in ("digits", "tiny", "tiny.int8"):
            assert client.get(f"/v2/models/{name}/ready").status_code == 200


def test_the_cli_refuses_a_clash_in_one_line(tiny_onnx: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"   # same spec arch as tiny_onnx: both 'tiny'
    copy.write_bytes(tiny_onnx.read_bytes())
    result = subprocess.run([sys.executable, "-m", "bnfold", "serve", str(tiny_onnx), str(copy), "--port", "0",
                             "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "two models would both be served as 'tiny'" in lines[-1] and "Traceback" not in result.stderr


def test_spec_with_several_models_names_them_and_what_to_do(tmp_path: Path, tiny_onnx: Path) -> None:
    # It said "not a repository of several" to a user who had given two files.
    spec = tmp_path / "spec.json"
    spec.write_text('{"labels": ["a", "b"], "mean": [0.5], "std": [0.5], "input_shape": [1, 28, 28]}')
    done = subprocess.run([sys.executable, "-m", "bnfold.serve", str(tiny_onnx), f"b={tiny_onnx}", "--spec", str(spec),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--spec applies to a single model file, and 2 models were given (b, tiny)" in done.stderr, done.stderr
