"""Verified writers for ONNX, TorchScript, torch.export and Triton model repositories.

Every writer folds a copy of the model with `bnfold.fold`, exports it, loads the file back
with the runtime that will serve it, compares it with the original eval-mode model, and only
then moves the file into place; a mismatch raises `bnfold.ParityError` and writes nothing.

The public names are imported on first use, so that `bnfold --help` reads `export.config`
(the defaults of `bnfold export`) without importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bnfold.lazy import lazy_attributes

if TYPE_CHECKING:
    from bnfold.export._common import FP16_RTOL, FP32_RTOL
    from bnfold.export.artifacts import export_checkpoint, export_model
    from bnfold.export.config import TRITON_MAX_BATCH_SIZE, EvaluateConfig, ExportConfig, Int8Config
    from bnfold.export.errors import (ExportError, OpsetError, OutputExistsError, UnknownFormatError,
                                      UnsupportedOpError)
    from bnfold.export.evaluate import EvaluationReport, evaluate_artifacts
    from bnfold.export.int8 import AccuracyGateError, export_int8
    from bnfold.export.onnx import export_onnx, read_spec
    from bnfold.export.program import export_program, load_program
    from bnfold.export.summary import ArtifactReport, ExportSummary
    from bnfold.export.torchscript import export_torchscript, load_torchscript
    from bnfold.export.triton import write_triton_repo
    from bnfold.export.writers import FILE_NAMES, FORMATS, WRITERS, Writer, check_formats

_LAZY = {
    "FP16_RTOL": "bnfold.export._common", "FP32_RTOL": "bnfold.export._common",
    "export_checkpoint": "bnfold.export.artifacts", "export_model": "bnfold.export.artifacts",
    "TRITON_MAX_BATCH_SIZE": "bnfold.export.config", "ExportConfig": "bnfold.export.config",
    "EvaluateConfig": "bnfold.export.config", "Int8Config": "bnfold.export.config",
    "ExportError": "bnfold.export.errors", "OpsetError": "bnfold.export.errors",
    "OutputExistsError": "bnfold.export.errors", "UnknownFormatError": "bnfold.export.errors",
    "UnsupportedOpError": "bnfold.export.errors",
    "EvaluationReport": "bnfold.export.evaluate", "evaluate_artifacts": "bnfold.export.evaluate",
    "AccuracyGateError": "bnfold.export.int8", "export_int8": "bnfold.export.int8",
    "export_onnx": "bnfold.export.onnx", "read_spec": "bnfold.export.onnx",
    "export_program": "bnfold.export.program", "load_program": "bnfold.export.program",
    "ArtifactReport": "bnfold.export.summary", "ExportSummary": "bnfold.export.summary",
    "export_torchscript": "bnfold.export.torchscript", "load_torchscript": "bnfold.export.torchscript",
    "write_triton_repo": "bnfold.export.triton",
    "FILE_NAMES": "bnfold.export.writers", "FORMATS": "bnfold.export.writers", "WRITERS": "bnfold.export.writers",
    "Writer": "bnfold.export.writers", "check_formats": "bnfold.export.writers",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
