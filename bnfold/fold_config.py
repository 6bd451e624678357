"""The configs of `bnfold fold` and `bnfold fold-onnx`: their defaults and checks, without importing torch.

`bnfold.fold_files.fold_and_save` and `fold_onnx_file` do the work; the CLI builds these with
`bnfold.options.from_args` and its parsers read the defaults from here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from bnfold.errors import BnfoldError
from bnfold.models.spec_options import SpecOptions

# The folded model must match the original to this max relative error unless told otherwise.
FOLD_RTOL = 1e-5


class _ParityOptions:
    """What fold and fold-onnx share: the check of `rtol` and `samples`, and the tolerance they mean."""

    rtol: float | None
    samples: int

    def __post_init__(self) -> None:
        if self.rtol is not None and not self.rtol > 0:
            raise BnfoldError(f"--rtol must be positive, got {self.rtol}")
        if self.samples < 1:
            raise BnfoldError(f"--samples must be at least 1, got {self.samples}")

    @property
    def tolerance(self) -> float:
        return FOLD_RTOL if self.rtol is None else self.rtol


@dataclass
class FoldConfig(_ParityOptions):
    """`bnfold fold`: a PyTorch model in, the folded module out, written only when parity holds."""

    model: str | os.PathLike             # anything models.load_model reads
    out: str | os.PathLike               # where to torch.save the folded module
    rtol: float | None = None            # None: FOLD_RTOL, as every command's --rtol
    samples: int = 8                     # random inputs in the parity check
    model_class: str | None = None
    model_args: str | dict | list | None = None
    weights: str | os.PathLike | None = None
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None
    batchnorm: list[str] | None = None   # --batchnorm CLASS=ADAPTER declarations (models.loader.load_batchnorms)


@dataclass
class FoldOnnxConfig(_ParityOptions):
    """`bnfold fold-onnx`: an ONNX file in, the folded file out (with a spec when one is given)."""

    model: str | os.PathLike             # the ONNX file to read
    out: str | os.PathLike               # the ONNX file to write
    rtol: float | None = None            # None: FOLD_RTOL, as every command's --rtol
    samples: int = 8
    input_shape: tuple[int, ...] | None = None
    spec_options: SpecOptions | None = None


__all__ = ["FOLD_RTOL", "FoldConfig", "FoldOnnxConfig"]
