"""Bring your own model: the user's own files through `bnfold export`, `fold-onnx`, `serve` and `train`.

Each case was a dead end before models.loader: a pickled torchvision model was "not a bnfold
checkpoint", a state_dict could not be told its class, an ONNX file from elsewhere had no spec
for /predictions, and a user's own models.py shadowed bnfold's package.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from bnfold.cli import main
from bnfold.models.spec import SPEC_METADATA_KEY, ModelSpec

USER_NET = textwrap.dedent("""
    from torch import nn

    class Net(nn.Module):
        def __init__(self, classes=3):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

        def forward(self, x):
            return self.head(self.features(x))
""")


def _bn_nodes(path: Path) -> int:
    return sum(1 for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization")


def _spec(path: Path) -> ModelSpec:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return ModelSpec.from_json(props[SPEC_METADATA_KEY])


def _post_image(url: str, path: str, image: Image.Image) -> tuple[int, dict]:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", path, body=buffer.getvalue(), headers={"content-type": "image/png"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture
def user_state_dict(tmp_path: Path, randomize_bn) -> tuple[Path, Path]:
    """usernet.py with class Net, and a state_dict of a Net(classes=3) with random BN statistics."""
    file = tmp_path / "usernet_sd.py"
    file.write_text(USER_NET)
    from bnfold.models.loader import import_class

    torch.manual_seed(0)
    model = randomize_bn(import_class(f"{file}:Net")(classes=3)).eval()
    torch.save({"state_dict": model.state_dict(), "epoch": 7}, tmp_path / "net_sd.pt")
    return file, tmp_path / "net_sd.pt"


@pytest.mark.slow
def test_torchvision_resnet18_saved_whole_exports_with_trust_pickle(tmp_path, capsys, randomize_bn):
    import torchvision

    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    torch.save(model, tmp_path / "r18.pt")
    out = tmp_path / "export"
    argv = ["export", str(tmp_path / "r18.pt"), "--input-shape", "1,3,64,64", "--format", "onnx", "--out",
            str(out), "--no-progress"]
    assert main(argv) == 2  # unpickling runs code: refused unless asked for
    assert "--trust-pickle" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--trust-pickle"]) == 0
    printed = capsys.readouterr().out
    assert "BatchNorm fold: 20 folded, 0 skipped" in printed and "model.onnx" in printed
    assert "a pickled torchvision.models.resnet.ResNet module" in printed  # says what the file was
    assert _bn_nodes(out / "model.onnx") == 0
    record = json.loads((out / "export.json").read_text())
    onnx_record = record["artifacts"][0]
    assert onnx_record["max_rel_error"] < 1e-5 and onnx_record["top1_agreement"] == 1.0
    assert record["spec"]["input_shape"] == [3, 64, 64] and len(record["spec"]["labels"]) == 10


def test_state_dict_with_model_class_exports_and_serves_predictions(tmp_path, capsys, user_state_dict):
    from bnfold.serve.launch import running_server

    file, state = user_state_dict
    out = tmp_path / "export"
    assert main(["export", str(state), "--input-shape", "1,3,32,32", "--format", "onnx", "--out", str(out),
                 "--no-progress"]) == 2
    assert "--model-class FILE.py:Class" in capsys.readouterr().err
    assert main(["export", str(state), "--model-class", f"{file}:Net", "--model-args", '{"classes": 3}',
                 "--input-shape", "1,3,32,32", "--format", "onnx,pt2", "--labels", "red,green,blue",
                 "--mean", "0.5", "--std", "0.25", "--out", str(out), "--no-progress"]) == 0
    assert "BatchNorm fold: 2 folded" in capsys.readouterr().out
    assert (out / "model.pt2").is_file() and _bn_nodes(out / "model.onnx") == 0
    spec = _spec(out / "model.onnx")
    assert spec.labels == ["red", "green", "blue"] and spec.preprocess.mean == [0.5] * 3
    with running_server(out / "model.onnx", threads=1, name="net") as url:
        status, body = _post_image(url, "/predictions/net", Image.new("RGB", (40, 40), (200, 30, 30)))
    assert status == 200, body
    assert body["predictions"][0]["label"] in spec.labels


def _foreign_onnx(path: Path, randomize_bn) -> Path:
    """An ONNX classifier made elsewhere: BatchNormalization nodes kept, no bnfold metadata."""
    torch.manual_seed(2)
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 1, 28, 28),), str(path), dynamo=False, do_constant_folding=False,
                          input_names=["pixels"], output_names=["scores"],
                          dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}})
    assert _bn_nodes(path) == 1
    return path


def test_onnx_from_elsewhere_gets_a_spec_and_predictions_answer_its_labels(tmp_path, capsys, randomize_bn):
    from bnfold.serve.launch import running_server

    src = _foreign_onnx(tmp_path / "foreign.onnx", randomize_bn)
    (tmp_path / "labels.txt").write_text("north\neast\nsouth\nwest\n")
    out = tmp_path / "export"
    assert main(["export", str(src), "--labels", str(tmp_path / "labels.txt"), "--mean", "0.1307", "--std",
                 "0.3081", "--out", str(out)]) == 0  # --format defaults to onnx alone for an ONNX file
    printed = capsys.readouterr().out
    assert "BatchNormalization nodes: 1 before, 0 after" in printed and "wrote" in printed
    assert _bn_nodes(out / "model.onnx") == 0
    spec = _spec(out / "model.onnx")
    assert spec.labels == ["north", "east", "south", "west"] and spec.preprocess.mode == "L"
    assert spec.preprocess.std == [0.3081] and spec.input_shape == [1, 28, 28]

    # fold-onnx takes the same spec options; the raw file is served with --spec.
    assert main(["fold-onnx", str(src), "--out", str(tmp_path / "folded.onnx"), "--labels", "n,e,s,w"]) == 0
    assert _spec(tmp_path / "folded.onnx").labels == ["n", "e", "s", "w"]
    (tmp_path / "spec.json").write_text(json.dumps({"labels": ["N", "E", "S", "W"], "mean": [0.5], "std": [0.5],
                                                    "input_shape": [1, 28, 28]}))
    digit = Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 255).astype(np.uint8), "L")
    with running_server(out / "model.onnx", threads=1, name="compass") as url:
        status, body = _post_image(url, "/predictions/compass", digit)
    assert status == 200, body
    assert body["predictions"][0]["label"] in spec.labels
    with running_server(src, threads=1, name="raw", extra_args=["--spec", str(tmp_path / "spec.json")]) as url:
        status, body = _post_image(url, "/predictions/raw", digit)
    assert status == 200, body
    assert body["predictions"][0]["label"] in ["N", "E", "S", "W"]


def test_serve_spec_with_the_wrong_number_of_labels_is_refused(tmp_path, capsys, randomize_bn):
    """It used to start and name the model's 4 classes with 2 labels (top_k=4 answered 2 of them)."""
    src = _foreign_onnx(tmp_path / "foreign.onnx", randomize_bn)
    (tmp_path / "spec.json").write_text(json.dumps({"labels": ["N", "S"], "input_shape": [1, 28, 28]}))
    assert main(["serve", str(src), "--spec", str(tmp_path / "spec.json"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "names 2 labels, but model 'foreign' outputs 4 scores" in err and "Traceback" not in err


def test_export_paper_cuts(tmp_path, capsys, untrained_lenet_checkpoint):
    err = lambda: capsys.readouterr().err  # noqa: E731
    assert main(["export", str(untrained_lenet_checkpoint.parent), "--out", str(tmp_path / "x")]) == 2
    assert "is a folder, not a model file" in err()
    assert main(["export", str(untrained_lenet_checkpoint), "--format", "pt2", "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 0  # the file is model.pt2: the name works as a format
    assert (tmp_path / "p" / "model.pt2").is_file()
    data = untrained_lenet_checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    assert main(["export", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "y")]) == 2
    assert "truncated or corrupt" in err()
    assert main(["bench", str(tmp_path / "cut.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "truncated or corrupt" in err()  # the same words in bench as in export
    assert main(["fold-onnx", str(tmp_path), "--out", str(tmp_path / "f.onnx")]) == 2
    assert "is a folder; give an ONNX file" in err()
    assert main(["serve", str(untrained_lenet_checkpoint), "--port", "0"]) == 2
    assert "is a PyTorch file; `bnfold serve` runs ONNX: export it first" in err()


def _console_script() -> str:
    script = Path(sys.executable).with_name("bnfold")
    found = str(script) if script.is_file() else shutil.which("bnfold")
    assert found, "the bnfold console script is not installed next to this python"
    return found


@pytest.mark.slow
def test_cli_in_a_folder_with_its_own_models_py_trains_exports_and_serves(tmp_path):
    """A user's models.py on PYTHONPATH used to replace bnfold's `models` package (a traceback in train)."""
    (tmp_path / "models.py").write_text(USER_NET)
    namespace: dict = {}
    exec(USER_NET, namespace)  # the user's class, without importing a module named `models` here
    torch.save(namespace["Net"](4).state_dict(), tmp_path / "net.pt")
    env = {**os.environ, "PYTHONPATH": ".", "OMP_NUM_THREADS": "1"}
    run = lambda *argv: subprocess.run([*argv], cwd=tmp_path, env=env, capture_output=True, text=True,  # noqa: E731
                                       timeout=600)
    bnfold = _console_script()
    train = run(bnfold, "train", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--device", "cpu",
                "--no-progress", "--threads", "1", "--out", "run")
    assert train.returncode == 0, train.stderr[-2000:]
    assert "Traceback" not in train.stderr and (tmp_path / "run" / "best.pt").is_file()
    # The legacy exporter: which exporter runs is not what this checks, and dynamo costs 10 s a file here.
    export = run(bnfold, "export", "run/best.pt", "--format", "onnx", "--legacy-onnx", "--out", "export",
                 "--no-progress")
    assert export.returncode == 0, export.stderr[-2000:]
    own = run(bnfold, "export", "net.pt", "--model-class", "models:Net", "--model-args", "[4]",
              "--input-shape", "1,3,24,24", "--format", "onnx", "--legacy-onnx", "--out", "own", "--no-progress")
    assert own.returncode == 0, own.stderr[-2000:]
    assert _bn_nodes(tmp_path / "export" / "model.onnx") == 0 and _bn_nodes(tmp_path / "own" / "model.onnx") == 0
    # ... and serve: the server process runs with the same PYTHONPATH, where `models` is the user's file.
    from bnfold.models import digit_image
    from bnfold.serve.launch import running_server

    with running_server(tmp_path / "export" / "model.onnx", threads=1, name="digits",
                        env={"PYTHONPATH": str(tmp_path)}) as url:
        status, body = _post_image(url, "/predictions/digits", digit_image(3)[0])
    assert status == 200, body
    assert body["predictions"][0]["label"] in [str(d) for d in range(10)]
