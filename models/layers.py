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


def bn2d(channels: int, momentum: float = 0.1, eps: float = 1e-5) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


def check_positive(**values: int) -> None:
    for key, value in values.items():
        if int(value) <= 0:
            raise BnfoldError(f"{key} must be positive, got {value!r}")
