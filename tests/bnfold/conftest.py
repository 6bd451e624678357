"""Shared helpers for the bnfold tests: BatchNorm with randomized statistics.

A fresh BatchNorm is the identity in eval mode (mean 0, var 1, gamma 1, beta 0), so a fold of
it proves nothing: every test randomizes running statistics and affine parameters first.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running mean/var and gamma/beta in every BatchNorm of `model`, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_((torch.rand(n, generator=g) * 2 - 1).to(m.running_mean.dtype))
                m.running_var.copy_((torch.rand(n, generator=g) * 1.5 + 0.25).to(m.running_var.dtype))
            if m.affine:
                m.weight.copy_((torch.rand(n, generator=g) + 0.5).to(m.weight.dtype))
                m.bias.copy_((torch.rand(n, generator=g) * 2 - 1).to(m.bias.dtype))
    return model


def max_rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return ((candidate - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="session")
def rand_bn():
    """`randomize_bn(model, seed=0)`."""
    return randomize_bn


@pytest.fixture(scope="session")
def rel_err():
    """`max_rel_error(reference, candidate)`: max |diff| / max |reference|."""
    return max_rel_error
