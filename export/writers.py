"""`WRITERS`: the export formats, one entry each (file name, verified writer, reader).

`export_checkpoint` and `bnfold bench` both read this table; a new format is one entry here
(and its writer module). Each writer takes `(model, spec, path, config, samples)` and returns
the `ArtifactReport` of a file it has already loaded back and compared with `model`; each
reader loads such a file on CPU.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.models.spec import ModelSpec

from bnfold.export import int8 as _int8, onnx as _onnx, program as _program, torchscript as _torchscript
from bnfold.export.config import ExportConfig
from bnfold.export.errors import UnknownFormatError
from bnfold.export.summary import ArtifactReport


def _fp16_onnx(model: nn.Module, spec: ModelSpec, path: Path, config: ExportConfig,
               samples: "torch.Tensor | None") -> ArtifactReport:
    """The ONNX writer with float16 weights whatever `config.fp16` says, so that one run can
    write FP32, FP16 and INT8 files side by side (`--format onnx,fp16,int8`)."""
    report = _onnx.export_from_config(model, spec, path, dataclasses.replace(config, fp16=True), samples)
    report.format = "fp16"
    return report


@dataclass(frozen=True)
class Writer:
    """One export format."""

    file_name: str
    write: Callable[[nn.Module, ModelSpec, Path, ExportConfig, "torch.Tensor | None"], ArtifactReport]
    read: Callable[[Path], Any]
    description: str


WRITERS: dict[str, Writer] = {
    "onnx": Writer("model.onnx", _onnx.export_from_config, _onnx.load_onnx,
                   "ONNX (dynamo or legacy exporter), checked with onnxruntime CPU"),
    "torchscript": Writer("model.ts", _torchscript.export_from_config, _torchscript.load_torchscript,
                          "traced and frozen TorchScript, needs only torch"),
    "program": Writer("model.pt2", _program.export_from_config, _program.load_program,
                      "torch.export program with a dynamic batch Dim"),
    "fp16": Writer("model.fp16.onnx", _fp16_onnx, _onnx.load_onnx,
                   "ONNX with float16 weights beside the FP32 model.onnx (what --fp16 makes of model.onnx)"),
    "int8": Writer(_int8.INT8_FILE, _int8.export_from_config, _onnx.load_onnx,
                   "INT8 QDQ ONNX calibrated on the training split, gated on eval-split accuracy"),
}

# Derived views, kept for callers that only need the names.
FORMATS: tuple[str, ...] = tuple(WRITERS)
FILE_NAMES: dict[str, str] = {name: writer.file_name for name, writer in WRITERS.items()}


# File-suffix names accepted for the writers' names.
FORMAT_ALIASES = {"pt2": "program", "torch.export": "program", "ts": "torchscript", "jit": "torchscript"}


def check_formats(formats: str | list[str] | tuple[str, ...]) -> list[str]:
    """Normalize a list (or comma-separated string) of format names; unknown names are refused."""
    if isinstance(formats, str):
        formats = formats.split(",")
    names: list[str] = []
    for raw in formats:
        name = raw.strip().lower()
        if not name:
            continue
        # Users name a format by its file as often as by its writer (model.pt2, model.ts).
        name = FORMAT_ALIASES.get(name, name)
        if name not in WRITERS:
            raise UnknownFormatError(
                f"unknown export format {raw!r}; choose from: {', '.join(WRITERS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UnknownFormatError(f"no export format given; choose from: {', '.join(WRITERS)}")
    return names


__all__ = ["WRITERS", "Writer", "FORMATS", "FILE_NAMES", "check_formats"]
