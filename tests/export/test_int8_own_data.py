"""INT8 for a model bnfold did not train: a state_dict + class file, calibrated on the user's images or
arrays, gated on a labelled eval folder (accuracy) or on agreement with FP32; a failed gate keeps
what passed and says what it refused, with advice that fits the data."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from bnfold.models.data import digits_arrays
from bnfold.cli import main
from bnfold.export.onnx import count_ops

NET_SOURCE = '''
import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
'''
SIZE = 16


@pytest.fixture(scope="module")
def own_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: net.py (the class), net_sd.pt (its state_dict, trained a little on the digits),
    calib/ (32 unlabelled images), eval/<digit>/ (10 labelled images per class), calib.npy."""
    root = tmp_path_factory.mktemp("own_model")
    (root / "net.py").write_text(NET_SOURCE)
    sys.path.insert(0, str(root))
    try:
        import net
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("net", None)
    torch.manual_seed(0)
    model = net.SmallNet()
    x_train, y_train = digits_arrays("train", SIZE)
    x = torch.from_numpy(x_train.astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(40):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.eval().state_dict(), root / "net_sd.pt")
    (root / "calib").mkdir()
    for i in range(32):
        Image.fromarray(x_train[i], "L").save(root / "calib" / f"{i:03d}.png")
    np.save(root / "calib.npy", x[:32].numpy())
    x_test, y_test = digits_arrays("test", SIZE)
    for label in range(10):
        folder = root / "eval" / str(label)
        folder.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(y_test == label)[:10]):
            Image.fromarray(x_test[i], "L").save(folder / f"{j}.png")
    return root


def _export(root: Path, *extra: str) -> int:
    return main(["export", "net_sd.pt", "--model-class", "net.py:SmallNet", "--input-shape", f"1,1,{SIZE},{SIZE}",
                 "--no-progress", *extra])


def test_state_dict_model_calibrated_on_an_image_folder_and_gated_on_labelled_images(
        own_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(own_model)
    code = _export(own_model, "--format", "onnx,int8", "--out", "exp", "--calibration-data", "calib",
                   "--eval-data", "eval", "--force")
    out = capsys.readouterr()
    assert code == 0, out.err
    record = next(a for a in json.loads((own_model / "exp" / "export.json").read_text())["artifacts"]
                  if a["format"] == "int8")["int8"]
    gate = record["accuracy"]
    assert record["gate"] == "accuracy" and gate["passed"] and gate["eval_samples"] == 100
    assert gate["fp32"] > 0.5, gate   # a model that learned something, measured on the user's folder
    assert "32 images of 'calib'" in record["calibration_inputs"] and record["calibration_samples"] == 32
    assert "accuracy on the 100 eval samples" in out.out
    proto = onnx.load(str(own_model / "exp" / "model.int8.onnx"))
    assert count_ops(proto, "QuantizeLinear") > 0 and count_ops(proto, "BatchNormalization") == 0

    # `bnfold evaluate` takes the same data: labelled, each file's accuracy; unlabelled, agreement with the first.
    files = ["exp/model.onnx", "exp/model.int8.onnx"]
    assert main(["evaluate", *files, "--eval-data", "eval", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["samples"] for r in rows] == [100, 100] and rows[0]["metric"] == "accuracy"
    assert rows[0]["value"] == pytest.approx(gate["fp32"]) and rows[1]["value"] == pytest.approx(gate["int8"])
    assert main(["evaluate", *files, "--eval-data", "calib"]) == 0
    table = capsys.readouterr().out
    assert "agreement with model.onnx" in table and "output error" in table
    assert main(["evaluate", *files, "--eval-data", "calib", "--json"]) == 0
    first, int8 = json.loads(capsys.readouterr().out)["results"]
    assert (first["value"], first["output_error"]) == (1.0, 0.0) and first["samples"] == 32
    assert 0.9 <= int8["value"] <= 1.0 and 0 < int8["output_error"] < 0.2


def test_without_labels_the_gate_is_agreement_on_held_out_calibration_inputs(
        own_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(own_model)
    code = _export(own_model, "--format", "int8", "--out", "agree", "--calibration-data", "calib.npy", "--force")
    out = capsys.readouterr()
    assert code == 0, out.err
    record = json.loads((own_model / "agree" / "export.json").read_text())["artifacts"][0]["int8"]
    gate = record["agreement"]
    assert record["gate"] == "agreement" and gate["passed"] and gate["samples"] == 8
    assert record["calibration_samples"] == 24   # a quarter held out, never calibrated on
    assert gate["top1_agreement"] >= 0.98 and 0 < gate["output_error"] <= 0.1
    assert "top-1" in out.out and "output error" in out.out   # both figures printed


def test_a_failed_gate_keeps_the_fp32_file_and_names_what_it_refused(
        own_model: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(own_model)
    np.save(own_model / "flat.npy", np.full((4, 1, SIZE, SIZE), 3.0, dtype=np.float32))
    code = _export(own_model, "--format", "onnx,int8", "--out", "refused", "--calibration-data", "flat.npy",
                   "--eval-data", "calib", "--force")
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "refused model.int8.onnx" in err and "(model.onnx, export.json)" in err
    assert "agreement with FP32" in err and "--min-agreement" in err
    # Advice that fits the data: the file gave 4 inputs; nobody is told to draw 1,024 of them.
    assert "--calibration-data (it gave 4)" in err and "--calibration-samples" not in err
    out = own_model / "refused"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    record = json.loads((out / "export.json").read_text())
    assert [r["file"] for r in record["refused"]] == ["model.int8.onnx"]


def test_a_gate_too_coarse_for_the_allowed_drop_says_so(own_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """12 eval images: one image is 8.3 points, so a 1-point gate cannot see a 1-point drop."""
    monkeypatch.chdir(own_model)
    small = own_model / "eval12"
    for label in range(3):
        (small / str(label)).mkdir(parents=True, exist_ok=True)
        for j in range(4):
            (small / str(label) / f"{j}.png").write_bytes((own_model / "eval" / str(label) / f"{j}.png").read_bytes())
    code = _export(own_model, "--format", "int8", "--out", "coarse", "--calibration-data", "calib",
                   "--eval-data", "eval12", "--force")
    out = capsys.readouterr().out
    assert code == 0
    assert "one sample is 8.3 points" in out and "cannot measure" in out and "at least 100 labelled images" in out


def test_unusable_data_options_get_one_line(own_model: Path, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(own_model)
    (own_model / "wrong").mkdir(exist_ok=True)
    (own_model / "wrong" / "cat").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8), "L").save(own_model / "wrong" / "cat" / "0.png")
    np.save(own_model / "bad_shape.npy", np.zeros((4, 3, 8, 8), np.float32))
    cases = [
        (["--format", "int8", "--out", "x1"], "--calibration-data PATH"),
        (["--format", "int8", "--out", "x2", "--calibration-data", "missing"], "does not exist"),
        (["--format", "int8", "--out", "x3", "--calibration-data", "bad_shape.npy"], "expected [N, 1, 16, 16]"),
        (["--format", "int8", "--out", "x4", "--calibration-data", "calib", "--eval-data", "wrong"],
         "not among the model's labels"),
        (["--format", "int8", "--out", "x5", "--calibration-data", "calib", "--min-agreement", "2"],
         "--min-agreement"),
    ]
    for args, expected in cases:
        code = _export(own_model, *args)
        err = capfd.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not (own_model / args[3]).exists()


def test_an_onnx_file_from_elsewhere_is_quantized_too(own_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """The torch.onnx file of the same class, its input named "x" and its BatchNorms left in: folded,
    stamped, then quantized and gated on the user's labelled folder."""
    monkeypatch.chdir(own_model)
    sys.path.insert(0, str(own_model))
    try:
        import net
    finally:
        sys.path.remove(str(own_model))
        sys.modules.pop("net", None)
    model = net.SmallNet()
    model.load_state_dict(torch.load(own_model / "net_sd.pt"))
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros(1, 1, SIZE, SIZE), str(own_model / "theirs.onnx"),
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    assert count_ops(onnx.load(str(own_model / "theirs.onnx")), "BatchNormalization") == 2
    code = main(["export", "theirs.onnx", "--format", "onnx,int8", "--out", "from_onnx", "--no-progress",
                 "--calibration-data", "calib", "--eval-data", "eval", "--force"])
    out = capsys.readouterr()
    assert code == 0, out.err
    record = json.loads((own_model / "from_onnx" / "export.json").read_text())
    int8 = next(a for a in record["artifacts"] if a["format"] == "int8")
    assert int8["input_name"] == "x" and int8["int8"]["accuracy"]["passed"]
    assert int8["int8"]["accuracy"]["eval_samples"] == 100


def test_histogram_calibration_takes_a_count_that_is_no_multiple_of_the_batch(
        own_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """24 calibration inputs (32 less the 8 held out): onnxruntime's percentile calibrator failed on a
    last batch of 8 after one of 16 ("inhomogeneous shape"); batches of one size now."""
    monkeypatch.chdir(own_model)
    code = _export(own_model, "--format", "int8", "--out", "pct", "--calibration-data", "calib.npy",
                   "--calibration", "percentile", "--force")
    out = capsys.readouterr()
    assert code == 0, out.err
    record = json.loads((own_model / "pct" / "export.json").read_text())["artifacts"][0]["int8"]
    assert record["calibration"] == "percentile" and record["calibration_samples"] == 24
