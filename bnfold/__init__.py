"""bnfold: fold eval-mode BatchNorm into neighbouring Conv / ConvTranspose / Linear weights.

    folded, report = bnfold.fold(model)                 # nn.Module -> nn.Module
    folded, report = bnfold.fold(model, example_inputs=x)  # also your own BN classes, by what they compute
    onnx_model, report = bnfold.fold_onnx("model.onnx") # any ONNX file
    bnfold.compare(model, folded, torch.randn(8, 3, 32, 32)).check(1e-5, "folded model")

The public names are imported on first use, so that `bnfold --help` (whose CLI lives in this
package) does not pay for importing torch and onnx.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bnfold.errors import BnfoldError, FoldSkipped, ParityError
from bnfold.lazy import lazy_attributes

if TYPE_CHECKING:
    from bnfold.adapters import BNStats
    from bnfold.fx_fold import count_batchnorm, fold
    from bnfold.patterns import DEFAULT_FOLDERS
    from bnfold.onnx_fold import ONNX_FOLDERS, count_onnx_batchnorm, fold_onnx
    from bnfold.parity import Parity, compare
    from bnfold.fold_report import FoldReport

_LAZY = {
    "fold": "bnfold.fx_fold", "count_batchnorm": "bnfold.fx_fold",
    "DEFAULT_FOLDERS": "bnfold.patterns", "BNStats": "bnfold.adapters",
    "fold_onnx": "bnfold.onnx_fold", "count_onnx_batchnorm": "bnfold.onnx_fold", "ONNX_FOLDERS": "bnfold.onnx_fold",
    "compare": "bnfold.parity", "Parity": "bnfold.parity",
    "FoldReport": "bnfold.fold_report",
}

__all__ = ["BnfoldError", "FoldSkipped", "ParityError", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
