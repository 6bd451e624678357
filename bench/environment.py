"""What a benchmark ran on: device names, library versions, threads, load, date, model and input."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from typing import Any

from bnfold.options import available_cpus
from bnfold.versions import __version__ as bnfold_version, cpu_name, package_version


def collect_environment(*, threads: int, spec: Any = None, checkpoint: str | os.PathLike | None = None,
                        dtype: str = "float32") -> dict[str, Any]:
    """What ran, for the report: device names, library versions, threads, date, model and input."""
    import numpy as np
    import onnxruntime
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "threads": threads,
        # Other processes competing for the cores: the first thing to check when figures look odd.
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "dtype": dtype,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "bnfold": bnfold_version,
        "torch": str(torch.__version__),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "onnx": package_version("onnx"),
        "numpy": np.__version__,
    }
    if spec is not None:
        env["model"] = spec.arch
        env["arch_kwargs"] = dict(spec.arch_kwargs)
        env["task"] = spec.task
        env["dataset"] = spec.dataset
        env["input_shape"] = list(spec.input_shape)
    if checkpoint is not None:
        env["checkpoint"] = str(checkpoint)
    return env


__all__ = ["available_cpus", "collect_environment", "cpu_name"]
