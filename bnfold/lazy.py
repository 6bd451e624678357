"""Public names imported on first use (PEP 562 module `__getattr__`), for every package's `__init__`.

`bnfold --help`, `bnfold loadtest` and the torch-free service import `bnfold`, `bnfold.models`,
`bnfold.serve` and `bnfold.bench` without paying for what those names pull in (torch, onnxruntime).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, resolving each name in `table` from the module it maps to.

    A resolved name is stored in the package's namespace, so later lookups do not come back here.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace.get("__all__", table))

    return __getattr__, __dir__


__all__ = ["lazy_attributes"]
