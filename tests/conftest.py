"""Suite-wide settings: deterministic, two-core friendly, GPU tests skipped with a reason."""
from __future__ import annotations

import pytest
import torch

# CI has 2 cores; torch's default pool fights pytest, onnxruntime and the HTTP server for them.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    reason = "needs a CUDA device: torch.cuda.is_available() is False on this machine"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random running mean/var and gamma/beta in every BatchNorm of `model`, in place.

    A fresh BatchNorm is the identity in eval mode (mean 0, var 1, gamma 1, beta 0), so folding
    it proves nothing: every test that checks a fold or an export randomizes these first.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_((torch.rand(n, generator=g) * 2 - 1).to(m.running_mean.dtype))
                m.running_var.copy_((torch.rand(n, generator=g) * 1.5 + 0.25).to(m.running_var.dtype))
                m.num_batches_tracked.fill_(7)
            if m.affine:
                m.weight.copy_((torch.rand(n, generator=g) + 0.5).to(m.weight.dtype))
                m.bias.copy_((torch.rand(n, generator=g) * 2 - 1).to(m.bias.dtype))
    return model


@pytest.fixture(scope="session")
def randomize_bn():
    """`randomize_bn(model, seed=0) -> model`: random BN statistics and affine parameters, in place."""
    return _randomize_bn
