"""What ran, looked up in one place: version strings (export.json, ONNX metadata, bench reports, the
HTTP service) and the CPU's name (bench reports, the INT8 record)."""
from __future__ import annotations

import contextlib
import importlib
import platform
from importlib import metadata
from pathlib import Path


def package_version(name: str) -> str | None:
    """The installed version of distribution or module `name`, or None when it is not installed.

    The distribution's metadata first (no import needed); then the module's `__version__`, for
    modules whose import name differs from their distribution's (onnxruntime-gpu, for example).
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:  # noqa: BLE001 - absent or broken: informative only, never fatal
        return None


def _bnfold_version() -> str:
    # A plain checkout that was never installed has no metadata: say so instead of guessing.
    return package_version("bnfold") or "0+unknown"


__version__ = _bnfold_version()


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


__all__ = ["__version__", "cpu_name", "package_version"]
