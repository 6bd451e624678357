"""Shared pieces for the export tests: randomized BatchNorm, small real models, a saved checkpoint.

A fresh BatchNorm is an identity (mean 0, var 1, gamma 1, beta 0), which would let a broken
fold pass; every model here gets random running statistics and affine parameters first.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from bnfold import models


@pytest.fixture(scope="module")
def lenet(randomize_bn) -> tuple[nn.Module, models.ModelSpec]:
    model, spec = models.build_for_dataset("lenet", "digits")
    return randomize_bn(model, seed=1).eval(), spec


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                     lenet: tuple[nn.Module, models.ModelSpec]) -> Path:
    model, spec = lenet
    return models.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lenet.pt", model, spec)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |candidate - reference| / max |reference|, the figure the tolerances are stated in."""
    reference, candidate = reference.double(), candidate.double()
    return float((candidate - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="session")
def rel_error() -> Callable[[torch.Tensor, torch.Tensor], float]:
    return relative_error
