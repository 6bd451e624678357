"""A real `bnfold serve` subprocess with the test module's own limits, shared by the limit tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bnfold.serve.launch import running_server


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory):
    """(url, pid, log path) of one server started with the module's `LIMITS` options."""
    log = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "serve.log"
    processes: list[subprocess.Popen] = []
    with running_server(tiny_onnx, threads=1, extra_args=request.module.LIMITS, log_path=log,
                        on_ready=processes.append) as url:
        yield url, processes[0].pid, log


@pytest.fixture
def url(served) -> str:
    return served[0]
