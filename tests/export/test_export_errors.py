"""Every refusal is clear (names the offending value), exits 2 from the CLI, and writes nothing."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from bnfold import export
from bnfold import models
from bnfold.cli import main
from bnfold.export.onnx import DYNAMO_OPSETS, LEGACY_OPSETS


@torch.library.custom_op("bnfold_export_test::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    """An operator no ONNX exporter knows: it has no translation and no decomposition."""
    return x * 2


@opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class WithOpaqueOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return opaque(self.bn(self.conv(x))).mean(dim=(2, 3))


class Noisy(nn.Module):
    """Adds fresh noise on every call: no exported file can reproduce the eager outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).mean(dim=(2, 3))
        return y + torch.rand_like(y)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["export", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_format_lists_the_valid_ones(untrained_lenet_checkpoint, tmp_path, capsys) -> None:
    code, _, err = _run(capsys, untrained_lenet_checkpoint, "--format", "onnx,tflite", "--out", tmp_path / "out")
    assert code == 2
    assert "'tflite'" in err and "onnx, torchscript, program" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(export.UnknownFormatError, match="choose from"):
        export.export_model(export.ExportConfig(untrained_lenet_checkpoint, tmp_path / "out", formats=()))
    # The first name still works, and says the new one.
    (tmp_path / "previous.txt").write_text("an earlier run")
    with pytest.warns(DeprecationWarning, match="export_model"):
        with pytest.raises(export.OutputExistsError):
            export.export_checkpoint(export.ExportConfig(untrained_lenet_checkpoint, tmp_path))


def test_existing_output_folder_needs_force(untrained_lenet_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, untrained_lenet_checkpoint, "--out", out)
    assert code == 2
    assert str(out) in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_never_replaces_the_folder_holding_the_checkpoint(untrained_lenet_checkpoint, tmp_path, capsys) -> None:
    code, _, err = _run(capsys, untrained_lenet_checkpoint, "--out", untrained_lenet_checkpoint.parent, "--force")
    assert code == 2 and "holds the checkpoint" in err
    assert untrained_lenet_checkpoint.is_file()


def test_a_file_that_is_not_a_bnfold_checkpoint_is_refused(tmp_path, capsys) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": nn.Linear(2, 2).state_dict()}, foreign)
    # Each refusal says what the file is and what to pass (models.loader).
    for path, says in ((text, "is not a model file bnfold can read"), (foreign, "is a state_dict")):
        code, _, err = _run(capsys, path, "--out", tmp_path / "out")
        assert code == 2
        assert str(path) in err and says in err
    code, _, err = _run(capsys, tmp_path / "missing.pt", "--out", tmp_path / "out")
    assert code == 2 and "no file at" in err
    assert not (tmp_path / "out").exists()


def test_opset_outside_the_supported_range_says_the_range(lenet, untrained_lenet_checkpoint, tmp_path, capsys) -> None:
    low, high = DYNAMO_OPSETS
    code, _, err = _run(capsys, untrained_lenet_checkpoint, "--opset", "5", "--out", tmp_path / "out")
    assert code == 2 and "5" in err and f"{low} to {high}" in err
    low, high = LEGACY_OPSETS
    code, _, err = _run(capsys, untrained_lenet_checkpoint, "--legacy-onnx", "--opset", str(high + 1),
                        "--out", tmp_path / "out")
    assert code == 2 and f"{low} to {high}" in err and "legacy" in err
    model, spec = lenet
    with pytest.raises(export.OpsetError, match=f"{DYNAMO_OPSETS[0]} to {DYNAMO_OPSETS[1]}"):
        export.export_onnx(model, spec, tmp_path / "m.onnx", opset=DYNAMO_OPSETS[1] + 1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("legacy", [pytest.param(False, marks=pytest.mark.dynamo), True], ids=["dynamo", "legacy"])
def test_an_operator_the_exporter_cannot_handle_is_named(lenet, tmp_path, legacy) -> None:
    _, spec = lenet
    model = WithOpaqueOp().eval()
    with pytest.raises(export.UnsupportedOpError) as info:
        export.export_onnx(model, spec, tmp_path / "model.onnx", legacy_onnx=legacy)
    assert info.value.op == "bnfold_export_test::opaque"
    assert "'bnfold_export_test::opaque'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_parity_failure_writes_no_file(lenet, tmp_path) -> None:
    _, spec = lenet
    spec = dataclasses.replace(spec, arch="noisy")
    model = Noisy().eval()
    writers = ((export.export_onnx, "model.onnx"), (export.export_torchscript, "model.ts"),
               (export.export_program, "model.pt2"))
    for writer, name in writers:
        with pytest.raises(bnfold.ParityError, match="max relative error"):
            writer(model, spec, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def _overflowing_checkpoint(lenet, path: Path) -> Path:
    """LeNet whose folded first conv weights exceed float16's range (65504): fine in float32,
    inf/NaN in float16, so the float16 export must fail its parity check."""
    model, spec = lenet
    model = copy.deepcopy(model)
    with torch.no_grad():
        bn = model.features[1]
        bn.weight.fill_(3e4)
        bn.running_var.fill_(1e-4)
    return models.save_checkpoint(path, model, spec)


def test_a_failed_export_leaves_the_previous_folder_and_repository_as_they_were(lenet, tmp_path, capsys) -> None:
    checkpoint = _overflowing_checkpoint(lenet, tmp_path / "overflow.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("previous export")
    repo = tmp_path / "repo"
    code, _, err = _run(capsys, checkpoint, "--fp16", "--force", "--out", out, "--triton-repo", repo)
    assert code == 2 and "max relative error" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    # No staging folders left behind, and the repository was never created.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "overflow.pt"]


def test_parity_error_carries_the_figures(lenet, tmp_path) -> None:
    checkpoint = _overflowing_checkpoint(lenet, tmp_path / "overflow.pt")
    model, spec = models.load_checkpoint(checkpoint)
    with pytest.raises(bnfold.ParityError, match="TorchScript export of lenet .float16."):
        export.export_torchscript(model, spec, tmp_path / "model.ts", fp16=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overflow.pt"]


def test_triton_repository_needs_onnx_and_refuses_an_existing_model(untrained_lenet_checkpoint, tmp_path) -> None:
    with pytest.raises(export.ExportError, match="onnx"):
        export.export_model(export.ExportConfig(untrained_lenet_checkpoint, tmp_path / "out", formats=["torchscript"],
                                                     triton_repo=tmp_path / "repo"))
    (tmp_path / "repo" / "lenet").mkdir(parents=True)
    (tmp_path / "repo" / "lenet" / "config.pbtxt").write_text("kept")
    with pytest.raises(export.OutputExistsError, match="lenet"):
        export.export_model(export.ExportConfig(untrained_lenet_checkpoint, tmp_path / "out", triton_repo=tmp_path / "repo"))
    assert (tmp_path / "repo" / "lenet" / "config.pbtxt").read_text() == "kept"
    assert not (tmp_path / "out").exists()


def test_triton_writer_refuses_bad_names_devices_and_missing_files(lenet, tmp_path) -> None:
    _, spec = lenet
    with pytest.raises(export.ExportError, match="does not exist"):
        export.write_triton_repo(tmp_path / "missing.onnx", spec, tmp_path / "repo")
    with pytest.raises(export.ExportError, match="'bad name'"):
        export.write_triton_repo(tmp_path / "missing.onnx", spec, tmp_path / "repo", name="bad name")
    assert not any(p.name != "repo" for p in tmp_path.iterdir())
    (tmp_path / "text.onnx").write_text("not a protobuf")
    with pytest.raises(export.ExportError, match="text.onnx.*not an ONNX model"):
        export.write_triton_repo(tmp_path / "text.onnx", spec, tmp_path / "repo")
    assert list((tmp_path / "repo").iterdir()) == []  # no staged model folder left behind


def test_format_names_are_normalized_and_an_onnx_file_without_a_spec_is_named(tmp_path) -> None:
    from bnfold.export.writers import check_formats

    assert check_formats(" ONNX,onnx ,program") == ["onnx", "program"]
    assert check_formats(["torchscript"]) == ["torchscript"]
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(export.ExportError, match="'bnfold.spec'"):
        export.read_spec(tmp_path / "plain.onnx")
    with pytest.raises(export.ExportError, match="does not exist"):
        export.read_spec(tmp_path / "absent.onnx")
    (tmp_path / "text.onnx").write_text("not a protobuf")
    with pytest.raises(export.ExportError, match="text.onnx.*not an ONNX model"):
        export.read_spec(tmp_path / "text.onnx")


def test_an_onnx_spec_from_a_newer_bnfold_is_refused_by_name(tmp_path, make_tiny_onnx) -> None:
    from bnfold.models.spec import SPEC_VERSION, SpecVersionError

    path = make_tiny_onnx(tmp_path / "newer.onnx")
    spec = export.read_spec(path)
    spec.spec_version = SPEC_VERSION + 1
    make_tiny_onnx(path, spec=spec)
    with pytest.raises(SpecVersionError, match=f"spec_version {SPEC_VERSION + 1}.*upgrade bnfold") as info:
        export.read_spec(path)
    assert "newer.onnx" in str(info.value)


def test_rtol_sets_the_parity_tolerance_as_on_fold(untrained_lenet_checkpoint, tmp_path, capsys) -> None:
    """--rtol was fold's and fold-onnx's only; export checks every file against the same option."""
    code, _, err = _run(capsys, untrained_lenet_checkpoint, "--format", "torchscript", "--rtol", "1e-15",
                        "--out", tmp_path / "strict")
    assert code == 2 and "max relative error" in err and "1e-15" in err.replace("1.0e-15", "1e-15")
    assert not (tmp_path / "strict").exists()
    code, _, err = _run(capsys, untrained_lenet_checkpoint, "--format", "torchscript", "--rtol", "0",
                        "--out", tmp_path / "zero")
    assert code == 2 and "--rtol must be positive" in err
