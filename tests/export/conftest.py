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

import models


def randomize_batchnorm(model: nn.Module, seed: int = 0, *, gamma_scale: float = 0.5,
                        var_low: float = 0.5) -> nn.Module:
    """Give every BatchNorm random running stats and affine parameters; returns the model in eval."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + var_low)
                if module.affine:
                    module.weight.copy_(1 + gamma_scale * torch.randn(n, generator=generator))
                    module.bias.copy_(0.3 * torch.randn(n, generator=generator))
    return model.eval()


@pytest.fixture(scope="session")
def randomize() -> Callable[..., nn.Module]:
    return randomize_batchnorm


@pytest.fixture(scope="module")
def lenet() -> tuple[nn.Module, models.ModelSpec]:
    model, spec = models.create("lenet", "digits")
    return randomize_batchnorm(model, seed=1), spec


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
