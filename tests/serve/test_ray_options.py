"""`bnfold serve --ray` options: checked before anything starts, each mistake one line and exit 2.

These need no Ray: this environment has none, which is itself one of the cases (the extra is
named). The deployment itself is tested on a real cluster in test_ray_cluster.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("args,words", [
    (["--replicas", "2"], "need --ray ADDRESS"),
    (["--max-ongoing-requests", "8"], "need --ray ADDRESS"),
    (["--ray", "127.0.0.1:6379", "--replicas", "0"], "--replicas must be from 1 to 1024, or auto; got 0"),
    (["--ray", "127.0.0.1:6379", "--replicas", "auto", "--min-replicas", "3", "--max-replicas", "2"],
     "--min-replicas and --max-replicas need 1 <= min <= max"),
    (["--ray", "127.0.0.1:6379", "--replica-cpus", "0"], "--replica-cpus must be positive"),
    (["--ray", "127.0.0.1:6379", "--max-ongoing-requests", "0"], "--max-ongoing-requests must be from 1"),
    (["--ray", "127.0.0.1:6379", "--replicas", "many"], "expected a number of replicas or auto, got 'many'"),
    (["--ray", "127.0.0.1:6379"], "--ray needs Ray Serve in this environment: pip install 'bnfold[ray]'"),
])
def test_a_ray_option_mistake_is_one_line_and_exit_2(tiny_onnx: Path, args: list[str], words: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bnfold.serve", str(tiny_onnx), *args],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    # one error line (argparse's own mistakes come after its usage lines), never a traceback
    assert lines[-1].startswith("bnfold serve: error:") and words in lines[-1], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
