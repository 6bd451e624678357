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
