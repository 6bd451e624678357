"""The example in ModelSpec's docstring runs as written: a module and a spec make a served ONNX file."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import onnx
import pytest

from bnfold.models.spec import ModelSpec


@pytest.mark.slow   # a dynamo ONNX export: about 9 s on 2 cores
def test_the_docstring_example_exports_a_file_the_service_names_and_labels(tmp_path: Path) -> None:
    doc = ModelSpec.__doc__ or ""
    code = textwrap.dedent(doc.split("name the classes:\n\n", 1)[1].split("\n\n    Then", 1)[0])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "ModelSpec.__doc__", "exec"), {})   # noqa: S102 - our own docstring
    finally:
        os.chdir(cwd)
    from bnfold.serve.runtime import open_session

    runtime = open_session(tmp_path / "catdog.onnx", threads=1)
    assert runtime.name == "catdog" and runtime.spec.labels == ["cat", "dog"]
    assert not [n for n in onnx.load(str(tmp_path / "catdog.onnx")).graph.node if n.op_type == "BatchNormalization"]
