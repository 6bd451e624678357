"""`WRITERS`: the export formats, one entry each, and everything else reads them from here.

An entry says the file name, how to write the file (a verified writer), how to read it back, what
kind of file it is (the kind `models.loader.detect_kind` finds in its bytes, so that the loader,
`bnfold evaluate` and `bnfold bench` open it), and what it is for `--help`. `export_model`,
`bnfold export --format`, `bench` (which exports what its rows need and reuses found files by
name) and the pipeline's report all read this table: a new format is one entry here (and its
writer function). This module imports no torch: the writer and reader are named
"module:function" and imported when called, so `bnfold --help` can list the formats.

Each writer takes `(model, spec, path, config, samples)` and returns the `ArtifactReport` of a
file it has already loaded back and compared with `model`; each reader loads such a file on CPU.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import UnknownFormatError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bnfold.models.spec import ModelSpec

    from .config import ExportConfig
    from .summary import ArtifactReport


def _resolve(target: str | Callable[..., Any]) -> Any:
    if callable(target):   # an entry added at run time may hold the function itself
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Writer:
    """One export format: its file, how it is written and read, and what kind of file that is."""

    file_name: str
    writer: str | Callable[..., "ArtifactReport"]   # "module:function" (model, spec, path, config, samples)
    reader: str | Callable[[Path], Any]            # "module:function" (path) -> the loaded file
    kind: str              # models.loader.detect_kind of the file: onnx, torchscript or program
    description: str

    def write(self, model: "nn.Module", spec: "ModelSpec", path: Path, config: "ExportConfig",
              samples: "torch.Tensor | None") -> "ArtifactReport":
        return _resolve(self.writer)(model, spec, path, config, samples)

    def read(self, path: str | Path) -> Any:
        return _resolve(self.reader)(path)


WRITERS: dict[str, Writer] = {
    "onnx": Writer("model.onnx", "bnfold.export.onnx:export_from_config", "bnfold.onnx_fold:load_onnx", "onnx",
                   "ONNX (dynamo or legacy exporter), checked with onnxruntime CPU"),
    "torchscript": Writer("model.ts", "bnfold.export.torchscript:export_from_config",
                          "bnfold.export.torchscript:load_torchscript", "torchscript",
                          "traced and frozen TorchScript, needs only torch"),
    "program": Writer("model.pt2", "bnfold.export.program:export_from_config", "bnfold.export.program:load_program",
                      "program", "torch.export program with a dynamic batch Dim"),
    "fp16": Writer("model.fp16.onnx", "bnfold.export.onnx:export_fp16_from_config", "bnfold.onnx_fold:load_onnx",
                   "onnx", "ONNX with float16 weights (float32 inputs and outputs) beside the FP32 model.onnx"),
    "int8": Writer("model.int8.onnx", "bnfold.export.int8:export_from_config", "bnfold.onnx_fold:load_onnx", "onnx",
                   "INT8 QDQ ONNX, calibrated on the training split and written only if it passes the accuracy gate"),
}

# Derived views, kept for callers that only need the names.
FORMATS: tuple[str, ...] = tuple(WRITERS)
FILE_NAMES: dict[str, str] = {name: writer.file_name for name, writer in WRITERS.items()}


# File-suffix names accepted for the writers' names.
FORMAT_ALIASES = {"pt2": "program", "torch.export": "program", "ts": "torchscript", "jit": "torchscript"}


def format_help(writers: dict[str, Writer] | None = None) -> str:
    """The formats for --help, from the table: name (aliases): what it writes."""
    writers = WRITERS if writers is None else writers
    parts = []
    for name, writer in writers.items():
        aliases = [a for a, target in FORMAT_ALIASES.items() if target == name]
        shown = f"{name} (or {', '.join(aliases)})" if aliases else name
        parts.append(f"{shown}: {writer.file_name}, {writer.description}")
    return "; ".join(parts)


def format_of_kind(kind: str, writers: dict[str, Writer] | None = None) -> str | None:
    """The first format whose files are of loader kind `kind` (a given file is its own artifact)."""
    writers = WRITERS if writers is None else writers
    return next((name for name, writer in writers.items() if writer.kind == kind), None)


def check_formats(formats: str | list[str] | tuple[str, ...], writers: dict[str, Writer] | None = None) -> list[str]:
    """Normalize a list (or comma-separated string) of format names; unknown names are refused."""
    writers = WRITERS if writers is None else writers
    if isinstance(formats, str):
        formats = formats.split(",")
    names: list[str] = []
    for raw in formats:
        name = raw.strip().lower()
        if not name:
            continue
        # Users name a format by its file as often as by its writer (model.pt2, model.ts).
        name = FORMAT_ALIASES.get(name, name)
        if name not in writers:
            raise UnknownFormatError(
                f"unknown export format {raw!r}; choose from: {', '.join(writers)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UnknownFormatError(f"no export format given; choose from: {', '.join(writers)}")
    return names


__all__ = ["WRITERS", "Writer", "FORMATS", "FILE_NAMES", "FORMAT_ALIASES", "check_formats", "format_help",
           "format_of_kind"]
