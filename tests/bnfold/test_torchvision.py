"""Whole torchvision networks (weights=None, randomized BN) fold to zero BatchNorm."""
from __future__ import annotations

import pytest
import torch
import torchvision

from bnfold import compare, count_batchnorm, fold


@pytest.mark.parametrize("name", [
    "resnet18",
    "mobilenet_v2",
    pytest.param("resnet50", marks=pytest.mark.extended),   # resnet18 stands for it in every run
])
def test_torchvision_folds_to_zero_batchnorm(name: str, randomize_bn) -> None:
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(weights=None, num_classes=100)).eval()
    before = count_batchnorm(model)
    folded, report = fold(model)
    assert before > 0 and count_batchnorm(folded) == 0, str(report)
    assert len(report.folded) == before and report.skipped == []
    assert type(folded) is type(model)
    parity = compare(model, folded, [torch.randn(2, 3, 64, 64) for _ in range(2)])
    parity.check(1e-5, f"folded {name}")
    assert parity.top1_agreement == 1.0 and parity.cosine > 0.999999
