"""The one place onnxruntime `SessionOptions` are built, for every package that opens a session.

bnfold opens onnxruntime sessions to check a folded graph (`fold_files`), to probe a file's output
shape (`models.loader`), to verify and evaluate exports (`export`), to serve (`serve.runtime`) and
to measure (`bench.backends`). They differ in thread count, in whether onnxruntime may rewrite the
graph, and in whether idle workers spin; everything else (one inter-op thread, sequential
execution, errors-only logging) is the same, and is written here once. onnxruntime is imported
when a session is made, never at import time.
"""
from __future__ import annotations

import os
from typing import Any

from bnfold.options import resolve_threads


def session_options(threads: int | None = 0, *, optimize: bool = True, spin: bool = True) -> Any:
    """`onnxruntime.SessionOptions` with `threads` intra-op threads (0 or None: the CPUs this process
    may use), one inter-op thread and sequential execution.

    optimize: False turns onnxruntime's graph rewrites off (to compare two graphs as written:
    onnxruntime would fold BatchNorm itself). spin: False stops idle workers from spinning, which
    on shared cores takes time from whatever else runs there (the service's event loop).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3   # errors only: the warnings are about graph details bnfold reports itself
    return options


def cpu_session(model: str | os.PathLike | bytes, threads: int | None = 0, *, optimize: bool = True) -> Any:
    """An onnxruntime CPU session of a file (or serialized model) with `session_options`."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, session_options(threads, optimize=optimize),
                                providers=["CPUExecutionProvider"])


__all__ = ["cpu_session", "session_options"]
