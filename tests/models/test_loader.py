"""models.loader: every kind of model file is recognized once, and each refusal says what to pass."""
from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bnfold.models.loader import LoaderError, detect_kind, load_model
from bnfold.models.spec_options import SpecError, SpecOptions, parse_labels, read_spec_file

NET_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, classes=4):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

        def forward(self, x):
            return self.body(x)
""")


@pytest.fixture
def user_net(tmp_path: Path):
    """A user's folder: usernet_<unique>.py defining Net, and its class (imported from that file)."""
    name = f"usernet_{tmp_path.name.replace('-', '_')}"
    file = tmp_path / f"{name}.py"
    file.write_text(NET_SOURCE)
    from bnfold.models.loader import import_class

    return file, import_class(f"{file}:Net")


def test_a_state_dict_needs_the_class_and_the_error_says_which_option(tmp_path, user_net):
    file, net = user_net
    torch.save(net(5).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(LoaderError, match="is a state_dict .*--model-class FILE.py:Class"):
        load_model(tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", model_class=f"{file}:Net", model_args='{"classes": 5}',
                        input_shape=(1, 3, 16, 16))
    assert loaded.kind == "state_dict" and not loaded.module.training
    assert loaded.output_shape() == (1, 5)
    spec = loaded.spec_with(SpecOptions(labels=list("abcde")))
    assert spec.input_shape == [3, 16, 16] and spec.labels == list("abcde") and spec.task == "classification"


def test_state_dict_of_the_wrong_size_names_the_mismatch(tmp_path, user_net):
    file, net = user_net
    torch.save({"model_state_dict": net(5).state_dict(), "epoch": 3}, tmp_path / "nested.pt")
    with pytest.raises(LoaderError, match=r"do not fit .*body.5.weight is \[5, 8\] in the file, \[4, 8\] in the model.*--model-args"):
        load_model(tmp_path / "nested.pt", model_class=f"{file}:Net")  # classes=4 by default
    assert load_model(tmp_path / "nested.pt", model_class=f"{file}:Net", model_args='{"classes": 5}').kind == "state_dict"


def test_a_pickled_module_loads_only_with_trust_pickle(tmp_path, user_net):
    _, net = user_net
    torch.save(net(), tmp_path / "whole.pt")
    with pytest.raises(LoaderError, match="--trust-pickle"):
        load_model(tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", trust_pickle=True)
    assert loaded.kind == "pickle" and loaded.input_shape is None
    with pytest.raises(LoaderError, match="--input-shape with the batch dimension first, e.g. --input-shape 1,3,224,224"):
        loaded.require_shape()


def test_a_module_pickled_from_a_script_points_to_model_class(tmp_path):
    script = tmp_path / "script_only.py"
    script.write_text("from torch import nn\nclass ScriptOnlyNet(nn.Module):\n    def __init__(self):\n"
                      "        super().__init__()\n        self.conv = nn.Conv2d(1, 2, 3)\n"
                      "    def forward(self, x):\n        return self.conv(x)\n")
    import __main__

    from bnfold.models.loader import import_class

    # What `python script_only.py` does when it saves: the class is recorded as __main__.ScriptOnlyNet.
    cls = import_class(f"{script}:ScriptOnlyNet")
    cls.__module__ = "__main__"
    __main__.ScriptOnlyNet = cls
    try:
        torch.save(cls(), tmp_path / "main.pt")
    finally:
        del __main__.ScriptOnlyNet
    with pytest.raises(LoaderError, match="saved from a script run directly .*--model-class SCRIPT.py:ScriptOnlyNet"):
        load_model(tmp_path / "main.pt", trust_pickle=True)
    loaded = load_model(tmp_path / "main.pt", trust_pickle=True, model_class=f"{script}:ScriptOnlyNet")
    assert loaded.kind == "pickle"


def test_input_shape_without_batch_is_answered_with_the_batch_added():
    with pytest.raises(LoaderError, match="has 3 dimensions.*try --input-shape 1,3,64,64"):
        load_model("torchvision:resnet18", input_shape=(3, 64, 64))
    with pytest.raises(LoaderError, match="gives 1 channels.*takes 3: try --input-shape 1,3,64,64"):
        load_model("torchvision:resnet18", input_shape=(1, 1, 64, 64))


def test_torchvision_name_builds_locally_with_imagenet_preprocessing(tmp_path):
    loaded = load_model("torchvision:resnet18", model_args='{"num_classes": 3}', input_shape=(1, 3, 32, 32))
    assert loaded.kind == "torchvision" and "random weights" in loaded.description
    torch.save(loaded.module.state_dict(), tmp_path / "w.pt")
    again = load_model("torchvision:resnet18", model_args={"num_classes": 3}, weights=tmp_path / "w.pt")
    assert "weights of" in again.description and again.input_shape == (1, 3, 224, 224)
    spec = loaded.spec_with()
    assert spec.preprocess.mean == pytest.approx([0.485, 0.456, 0.406]) and spec.labels == ["0", "1", "2"]


def test_file_kinds_are_detected_from_bytes_not_names(tmp_path, tiny_onnx):
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.randn(1, 1, 8, 8)), tmp_path / "a.bin")
    torch.export.save(torch.export.export(model, (torch.randn(1, 1, 8, 8),)), tmp_path / "b.pt2")
    (tmp_path / "c.pt").write_bytes(tiny_onnx.read_bytes())
    assert detect_kind(tmp_path / "a.bin") == "torchscript"
    assert detect_kind(tmp_path / "b.pt2") == "program"
    assert detect_kind(tmp_path / "c.pt") == "onnx"
    onnx_loaded = load_model(tmp_path / "c.pt")
    assert onnx_loaded.kind == "onnx" and onnx_loaded.module is None and onnx_loaded.input_shape == (1, 1, 28, 28)
    assert onnx_loaded.spec is not None and onnx_loaded.output_shape() == (1, 10)
    assert load_model(tmp_path / "b.pt2").input_shape == (1, 1, 8, 8)


def test_folders_truncated_and_foreign_files_are_one_line_errors(tmp_path, trained_lenet_checkpoint):
    with pytest.raises(LoaderError, match="is a folder, not a model file.*best.pt"):
        load_model(trained_lenet_checkpoint.parent)
    data = trained_lenet_checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoaderError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoaderError, match="not a model file bnfold can read"):
        load_model(tmp_path / "notes.txt")
    loaded = load_model(trained_lenet_checkpoint)
    assert loaded.kind == "checkpoint" and loaded.spec.arch == "lenet" and loaded.input_shape == (1, 1, 28, 28)


def test_spec_options_and_spec_files(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n\n")
    assert parse_labels(str(tmp_path / "labels.txt")) == ["cat", "dog"]
    assert parse_labels("a, b,c") == ["a", "b", "c"]
    (tmp_path / "spec.json").write_text('{"labels": ["x", "y"], "mean": [0.5], "std": [0.5], "input_shape": [1, 8, 8]}')
    spec = read_spec_file(tmp_path / "spec.json")
    assert spec.labels == ["x", "y"] and spec.preprocess.mode == "L" and spec.input_shape == [1, 8, 8]
    (tmp_path / "bad.json").write_text('{"labels": ["x"], "colour": 1, "input_shape": [1, 8, 8]}')
    with pytest.raises(SpecError, match="unknown keys \\['colour'\\]"):
        read_spec_file(tmp_path / "bad.json")
    with pytest.raises(SpecError, match="is a folder"):
        read_spec_file(tmp_path)


def test_a_batchnorm_declaration_that_names_a_missing_file_is_blamed_on_batchnorm(tmp_path: Path) -> None:
    # The message once said "--model-class 'nope.py:MyBN'" for a --batchnorm the user typed.
    from bnfold.models.loader import load_batchnorms

    missing = tmp_path / "nope.py"
    with pytest.raises(LoaderError) as caught:
        load_batchnorms([f"{missing}:MyBN={missing}:read_bn"])
    assert str(caught.value).startswith(f"--batchnorm '{missing}:MyBN': there is no file"), caught.value
    assert "--model-class" not in str(caught.value)
