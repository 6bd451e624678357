"""Small building blocks shared by the architectures."""
from __future__ import annotations

from torch import nn

from bnfold.errors import BnfoldError

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise BnfoldError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}") from None


def check_norm(norm: str) -> None:
    if norm not in ("bn", "none"):
        raise BnfoldError(f"unknown norm {norm!r}; choose 'bn' or 'none'")


def check_positive(**values: int) -> None:
    for key, value in values.items():
        if int(value) <= 0:
            raise BnfoldError(f"{key} must be positive, got {value!r}")
