"""Errors the person running `bnfold export` can fix; each message names the offending value."""
from __future__ import annotations

from bnfold.errors import BnfoldError


class ExportError(BnfoldError):
    """An artifact could not be written (exporter failure, leftover BatchNorm, bad argument)."""


class UnknownFormatError(ExportError):
    """A format name that is not one of `export.FORMATS`."""


class OutputExistsError(ExportError):
    """The output folder already exists and overwriting was not asked for."""


class OpsetError(ExportError):
    """An ONNX opset outside the range the chosen exporter (and onnxruntime) supports."""


class UnsupportedOpError(ExportError):
    """The exporter met an operator it cannot translate; `op` names it."""

    def __init__(self, op: str, message: str) -> None:
        super().__init__(message)
        self.op = op
