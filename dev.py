#!/usr/bin/env python3
"""Set bnfold up from nothing but Python, then run its main job or its tests.

    python3 dev.py demo     # train -> fold -> export -> verify -> bench on the bundled digits
    python3 dev.py test     # the test suite on both cores (what CI runs); --extended adds the nightly cases
    python3 dev.py setup    # only create .venv and install bnfold with its test extras

Extra arguments after the verb go to the command: `python3 dev.py test -k fold -x`.
The virtual environment lives in `.venv` beside this file (override with BNFOLD_VENV); it
is reinstalled whenever pyproject.toml changes.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("BNFOLD_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".bnfold-installed"


def _pyproject_digest() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def setup() -> None:
    """Create the venv and install bnfold (editable) with its test extras, once per pyproject."""
    if not PYTHON.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = _pyproject_digest()
    if STAMP.exists() and STAMP.read_text().strip() == digest:
        return
    print("installing bnfold and its dependencies (torch is large: a few minutes the first time)", flush=True)
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "-qq", "--disable-pip-version-check",
         "-e", f"{ROOT}[test,compare]"],
        check=True,
    )
    STAMP.write_text(digest + "\n")


def _workers(args: list[str]) -> list[str]:
    """pytest-xdist on two workers, each test module whole on one of them (its module fixtures are
    built once), unless the arguments choose for themselves (-n, --dist, -p no:xdist, --pdb)."""
    chosen = any(arg in {"-n", "--numprocesses", "--pdb", "no:xdist", "-pno:xdist"}
                 or arg.startswith(("-n", "--numprocesses=", "--dist")) for arg in args)
    return [] if chosen else ["-n", "2", "--dist", "loadscope"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    if argv[0] not in {"setup", "demo", "test"}:
        print(f"dev.py: unknown command {argv[0]!r}; choose demo, test or setup (python3 dev.py --help)",
              file=sys.stderr)
        return 2
    verb, rest = argv[0], argv[1:]
    try:
        setup()
    except subprocess.CalledProcessError as exc:
        print(f"dev.py: installing dependencies failed (exit {exc.returncode}); see pip's output above",
              file=sys.stderr)
        return exc.returncode or 1
    if verb == "setup":
        return 0
    if verb == "demo":
        command = [str(BIN / "bnfold"), "pipeline", *rest]
        if not any(arg == "--out" or arg.startswith("--out=") for arg in rest):
            # The demo's own folder (runs/demo) is rewritten on every run; a folder the user
            # names is never overwritten without their --force.
            command.append("--force")
        if not any(arg == "--threads" or arg.startswith("--threads=") for arg in rest):
            # The demo's latency ratios are batch-1 figures of a small model: one thread, as its
            # README figures were taken (--threads 0, every command's default, takes every CPU).
            command += ["--threads", "1"]
    else:
        command = [str(PYTHON), "-m", "pytest", *_workers(rest), *rest]
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
