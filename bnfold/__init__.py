"""bnfold: fold eval-mode BatchNorm into neighbouring Conv / ConvTranspose / Linear weights.

    folded, report = bnfold.fold(model)                 # nn.Module -> nn.Module
    onnx_model, report = bnfold.fold_onnx("model.onnx") # any ONNX file
    bnfold.compare(model, folded, torch.randn(8, 3, 32, 32)).check(1e-5, "folded model")
"""
from bnfold.errors import BnfoldError, ParityError
from bnfold.graph import count_batchnorm, fold
from bnfold.modules import DEFAULT_FOLDERS, FoldSkipped
from bnfold.onnx_fold import count_onnx_batchnorm, fold_onnx
from bnfold.parity import Parity, compare
from bnfold.report import FoldReport

__all__ = [
    "BnfoldError", "ParityError", "FoldSkipped", "FoldReport", "Parity", "DEFAULT_FOLDERS",
    "fold", "fold_onnx", "compare", "count_batchnorm", "count_onnx_batchnorm",
]
