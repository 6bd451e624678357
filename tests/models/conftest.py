"""Fixtures for the models tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine params: a fresh BN is an identity and would prove nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
                m.weight.copy_(torch.randn(n, generator=gen) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
                m.num_batches_tracked.fill_(7)
    return model


@pytest.fixture
def random_bn():
    return randomize_bn
