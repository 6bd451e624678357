"""`bnfold fold` and `bnfold fold-onnx`: success, and every error a user can make (exit 2)."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from bnfold import BnfoldError, count_batchnorm
from bnfold.cli import main
from bnfold.fold_files import onnx_input_shape


@pytest.fixture
def saved_module(tmp_path: Path, randomize_bn) -> Path:
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))).eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path


def test_fold_saved_module(saved_module: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "folded.pt"
    assert main(["fold", str(saved_module), "--out", str(out), "--input-shape", "2,3,16,16", "--samples", "3",
                 "--trust-pickle"]) == 0
    printed = capsys.readouterr().out
    assert "BatchNorm fold: 2 folded, 0 skipped" in printed
    assert "parity over 6 samples" in printed and "BatchNorm left: 0 of 2" in printed
    folded = torch.load(out, weights_only=False)
    original = torch.load(saved_module, weights_only=False)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_fold_bnfold_checkpoint_takes_the_shape_from_its_spec(tmp_path: Path, capsys, randomize_bn) -> None:
    from bnfold import models
    model, spec = models.build_for_dataset("lenet", "digits")
    ckpt = models.save_checkpoint(tmp_path / "ckpt.pt", randomize_bn(model), spec)
    assert main(["fold", str(ckpt), "--out", str(tmp_path / "folded.pt")]) == 0
    printed = capsys.readouterr().out
    assert f"input shape 1,{','.join(map(str, spec.input_shape))}" in printed
    folded = torch.load(tmp_path / "folded.pt", weights_only=False)
    assert isinstance(folded, nn.Module) and count_batchnorm(folded) == 0
    assert "BatchNorm left: 0 of 4" in printed


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_fold_errors(saved_module: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "never.pt"
    assert "no file at" in _error(["fold", str(tmp_path / "missing.pt"), "--out", str(out)], capsys)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file" * 20)
    assert "not a model file bnfold can read" in _error(["fold", str(corrupt), "--out", str(out)], capsys)

    state = tmp_path / "state.pt"
    torch.save(torch.load(saved_module, weights_only=False).state_dict(), state)
    assert "is a state_dict" in _error(["fold", str(state), "--out", str(out)], capsys)
    assert "--trust-pickle" in _error(["fold", str(saved_module), "--out", str(out)], capsys)

    other = tmp_path / "list.pt"
    torch.save([torch.ones(2)], other)
    assert "holds a list, not a model" in _error(["fold", str(other), "--out", str(out)], capsys)

    trust = ["--trust-pickle"]
    err = _error(["fold", str(saved_module), "--out", str(out), *trust], capsys)
    assert "input shape" in err and "--input-shape 1,3,224,224" in err  # the channels of its first Conv2d

    err = _error(["fold", str(saved_module), "--out", str(out), "--input-shape", "1,5,16,16", *trust], capsys)
    assert "gives 5 channels" in err and "try --input-shape 1,3,16,16" in err

    err = _error(["fold", str(saved_module), "--out", str(out), "--input-shape", "2,3,8,8", "--rtol", "1e-15",
                  *trust], capsys)
    assert "disagrees with its source" in err and "max relative error" in err
    assert not out.exists()


def _export_lenet_head(path: Path, randomize_bn, dynamic_spatial: bool = False) -> None:
    torch.manual_seed(1)
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6))).eval()
    axes = {"input": {0: "batch", 2: "h", 3: "w"} if dynamic_spatial else {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 1, 12, 12),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes)


def test_fold_onnx(tmp_path: Path, capsys, randomize_bn) -> None:
    src, dst = tmp_path / "in.onnx", tmp_path / "out" / "folded.onnx"
    _export_lenet_head(src, randomize_bn)
    assert main(["fold-onnx", str(src), "--out", str(dst)]) == 0
    printed = capsys.readouterr().out
    assert "BatchNorm left: 0 of 1" in printed and "Gemm" in printed and "parity over 8 samples" in printed
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(dst)).graph.node)


def test_fold_onnx_errors(tmp_path: Path, capsys, randomize_bn) -> None:
    dst = tmp_path / "never.onnx"
    assert "no ONNX file" in _error(["fold-onnx", str(tmp_path / "missing.onnx"), "--out", str(dst)], capsys)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    assert "ONNX" in _error(["fold-onnx", str(corrupt), "--out", str(dst)], capsys)

    src = tmp_path / "dyn.onnx"
    _export_lenet_head(src, randomize_bn, dynamic_spatial=True)
    err = _error(["fold-onnx", str(src), "--out", str(dst)], capsys)
    assert "symbolic axis 2 (h)" in err and "--input-shape" in err
    assert main(["fold-onnx", str(src), "--out", str(dst), "--input-shape", "1,1,10,10"]) == 0
    capsys.readouterr()
    dst.unlink()
    # The first spelling, `fold-onnx IN OUT`, still works and says to use --out.
    err = _error(["fold-onnx", str(src), str(dst), "--input-shape", "1,1,10,10", "--rtol", "1e-15"], capsys)
    assert "disagrees with its source" in err and not dst.exists()
    assert "the positional output is deprecated, use --out" in err
    assert "--out is required" in _error(["fold-onnx", str(src)], capsys)


def test_console_entry_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bnfold", "fold", str(tmp_path / "nope.pt"), "--out",
                           str(tmp_path / "o.pt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bnfold fold: error: no file at" in proc.stderr and "Traceback" not in proc.stderr


def test_help_warns_about_pickles() -> None:
    proc = subprocess.run([sys.executable, "-m", "bnfold", "fold", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "weights_only=False" in proc.stdout


def test_onnx_input_shape_of_a_graph_without_inputs() -> None:
    graph = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0])])
    with pytest.raises(BnfoldError, match="no inputs"):
        onnx_input_shape(helper.make_model(graph))
    assert onnx_input_shape(helper.make_model(graph), (2, 3)) == (2, 3)
