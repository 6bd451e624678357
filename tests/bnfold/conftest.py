"""Shared helpers for the bnfold tests (BN randomizing lives in tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch


def max_rel_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    reference, candidate = reference.double(), candidate.double()
    return ((candidate - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="session")
def rel_err():
    """`max_rel_error(reference, candidate)`: max |diff| / max |reference|."""
    return max_rel_error
