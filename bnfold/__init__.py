"""bnfold: fold eval-mode BatchNorm into neighbouring Conv / ConvTranspose / Linear weights."""
from bnfold.errors import BnfoldError, ParityError

__all__ = ["BnfoldError", "ParityError"]
