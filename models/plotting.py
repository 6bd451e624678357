"""matplotlib for writing chart files: the non-interactive Agg backend, chosen in one place."""
from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` drawing to files only: servers and CI have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


__all__ = ["pyplot"]
