"""Shared pieces for the export tests: small real models with randomized BatchNorm, an untrained checkpoint.

A fresh BatchNorm is an identity (mean 0, var 1, gamma 1, beta 0), which would let a broken
fold pass; every model here gets random running statistics and affine parameters first.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from bnfold import models


@pytest.fixture(scope="module")
def lenet(randomize_bn) -> tuple[nn.Module, models.ModelSpec]:
    model, spec = models.build_for_dataset("lenet", "digits")
    return randomize_bn(model, seed=1).eval(), spec


@pytest.fixture(scope="module")
def untrained_lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                               lenet: tuple[nn.Module, models.ModelSpec]) -> Path:
    """`lenet` (untrained, random BatchNorm statistics) saved as a checkpoint: quick to make, and the
    exports are checked against it, not against accuracy (`trained_lenet_checkpoint` is the trained one)."""
    model, spec = lenet
    return models.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lenet.pt", model, spec)


@pytest.fixture(scope="session")
def model_config_pb2():
    """Triton's ModelConfig protobuf module, to parse the config.pbtxt files export writes.

    It ships with tritonclient's grpc extra (grpcio): optional, so a machine without it skips
    the tests that parse a config instead of failing the collection of the whole file.
    """
    return pytest.importorskip("tritonclient.grpc.model_config_pb2",
                               reason="tritonclient[grpc] is not installed (pip install 'bnfold[test]')")
