"""The export format table is complete: one `Writer` entry is a format that export writes, --help
lists, the loader and evaluate open, and bench finds by its file name."""
from __future__ import annotations

from pathlib import Path

import pytest

from bnfold.export import writers


def write_copy(model, spec, path, config, samples):
    """A dummy format: the ONNX writer under another file name."""
    from bnfold.export.onnx import export_from_config

    report = export_from_config(model, spec, path, config, samples)
    report.format = "copy"
    return report


@pytest.fixture
def copy_format(monkeypatch: pytest.MonkeyPatch) -> writers.Writer:
    entry = writers.Writer("model.copy.onnx", f"{__name__}:write_copy", "bnfold.onnx_fold:load_onnx", "onnx",
                           "a dummy format for this test")
    monkeypatch.setitem(writers.WRITERS, "copy", entry)
    return entry


def test_one_writer_entry_is_a_whole_format(copy_format, untrained_lenet_checkpoint: Path, tmp_path: Path,
                                            capsys) -> None:
    from bnfold.bench.run import _prepare_artifacts
    from bnfold.cli import build_parser, main
    from bnfold.export.evaluate import load_artifact
    from bnfold.models.loader import detect_kind

    # --help lists it, --format takes it, and export writes and verifies it.
    export_help = " ".join(build_parser()._subparsers._group_actions[0].choices["export"].format_help().split())
    assert "copy: model.copy.onnx, a dummy format for this test" in export_help
    out = tmp_path / "out"
    assert main(["export", str(untrained_lenet_checkpoint), "--format", "copy", "--out", str(out),
                 "--legacy-onnx", "--no-progress"]) == 0
    written = out / "model.copy.onnx"
    assert written.is_file() and "model.copy.onnx" in capsys.readouterr().out
    # The loader and evaluate open it by the kind the entry names.
    assert detect_kind(written) == copy_format.kind
    artifact = load_artifact(written)
    assert artifact.kind == "onnx" and artifact.spec is not None
    # bench reuses it from an export folder by its file name instead of exporting it again.
    found, errors = _prepare_artifacts(None, None, {"copy"}, tmp_path / "work", out, "unused")
    assert found == {"copy": written} and errors == {}
