"""Verified writers for ONNX, TorchScript, torch.export and Triton model repositories.

Every writer folds a copy of the model with `bnfold.fold`, exports it, loads the file back
with the runtime that will serve it, compares it with the original eval-mode model, and only
then moves the file into place; a mismatch raises `bnfold.ParityError` and writes nothing.
"""
from bnfold.export._common import FP16_RTOL, FP32_RTOL
from bnfold.export.artifacts import export_checkpoint
from bnfold.export.config import TRITON_MAX_BATCH_SIZE, ExportConfig
from bnfold.export.errors import (ExportError, OpsetError, OutputExistsError, UnknownFormatError,
                           UnsupportedOpError)
from bnfold.export.evaluate import EvaluationReport, evaluate_artifacts
from bnfold.export.int8 import AccuracyGateError, Int8Config, export_int8
from bnfold.export.onnx import export_onnx, read_spec
from bnfold.export.program import export_program, load_program
from bnfold.export.summary import ArtifactReport, ExportSummary
from bnfold.export.torchscript import export_torchscript, load_torchscript
from bnfold.export.triton import write_triton_repo
from bnfold.export.writers import FILE_NAMES, FORMATS, WRITERS, Writer, check_formats

__all__ = [
    "export_onnx", "export_torchscript", "export_program", "write_triton_repo",
    "export_checkpoint", "ExportConfig", "WRITERS", "Writer", "check_formats",
    "TRITON_MAX_BATCH_SIZE", "read_spec", "load_program", "load_torchscript",
    "ArtifactReport", "ExportSummary", "FORMATS", "FILE_NAMES", "FP32_RTOL", "FP16_RTOL",
    "ExportError", "OpsetError", "OutputExistsError", "UnknownFormatError", "UnsupportedOpError",
    "export_int8", "Int8Config", "AccuracyGateError", "evaluate_artifacts", "EvaluationReport",
]
