"""Peer projects in their own virtual environments, built on first use with pip.

Comparisons run other servers and clients (KServe's `ModelServer`, its Python clients) whose
pinned dependencies clash with bnfold's own. Each such peer gets a virtual environment of its
own under a git-ignored folder of the repository (`.peers/<name>/`, or `$BNFOLD_PEERS_DIR/<name>/`):

    from bnfold.bench.peers import peer_python
    python = peer_python("kserve")          # Path to .peers/kserve/bin/python, built if missing
    subprocess.run([str(python), "my_kserve_model.py", ...])

`peer_python(name)` builds the environment the first time (a minute or two: `python -m venv`, then
`pip install` of the packages `PEERS[name]` lists), and afterwards returns the cached one at once.
A stamp file holds the package list the environment was built from; when the list changes, the
environment is built again. A lock file serializes concurrent builders (parallel tests). Pass
`packages=[...]` for a peer that is not in `PEERS`. Failures raise `PeerError` with pip's last lines.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from bnfold.errors import BnfoldError

# Exact pins: a comparison measured today must be the same comparison tomorrow.
PEERS: dict[str, list[str]] = {
    # KServe's Python SDK (ModelServer: REST + gRPC Open Inference Protocol v2) and the runtime its
    # model class wraps; the SDK pins versions of fastapi, protobuf and grpcio of its own.
    "kserve": ["kserve==0.21.0", "onnxruntime"],
}

_REPO = Path(__file__).resolve().parents[1]
_STAMP = "bnfold-peer.txt"


class PeerError(BnfoldError):
    """A peer environment could not be built."""


def peers_dir() -> Path:
    """Where peer environments live: $BNFOLD_PEERS_DIR, else `.peers/` at the repository's root."""
    return Path(os.environ.get("BNFOLD_PEERS_DIR") or _REPO / ".peers")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def peer_python(name: str, *, packages: Sequence[str] | None = None, quiet: bool = True) -> Path:
    """The Python interpreter of peer `name`'s virtual environment, built with pip if missing or stale.

    packages: what to install (default `PEERS[name]`). The environment's interpreter is the one
    running this code (same Python version). Progress goes to stderr unless `quiet`.
    """
    wanted = list(packages) if packages is not None else PEERS.get(name)
    if wanted is None:
        raise PeerError(f"unknown peer {name!r}; known: {sorted(PEERS)} (or pass packages=[...])")
    root = peers_dir() / name
    python = root / "bin" / "python"
    stamp_text = "\n".join(wanted) + "\n"
    with _locked(peers_dir() / f".{name}.lock"):
        stamp = root / _STAMP
        if python.exists() and stamp.exists() and stamp.read_text() == stamp_text:
            return python
        if root.exists():
            shutil.rmtree(root)
        print(f"bnfold: building the {name} peer environment in {root} (pip install {' '.join(wanted)}); "
              f"this happens once", file=sys.stderr, flush=True)
        base = getattr(sys, "_base_executable", sys.executable)   # a venv made from the base interpreter
        _check([base, "-m", "venv", str(root)], f"python -m venv {root}")
        command = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        command += (["-q"] if quiet else []) + wanted
        _check(command, f"pip install {' '.join(wanted)}")
        stamp.write_text(stamp_text)
    return python


def _check(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise PeerError(f"{what} failed (exit {result.returncode}):\n" + "\n".join(tail))


__all__ = ["PEERS", "PeerError", "peer_python", "peers_dir"]
