"""TorchScript writer: trace, freeze, save, load back, verify. The file needs only torch."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

import bnfold
from bnfold.models.spec import ModelSpec

from bnfold.export._common import (example_input, exporter_failure, float32_runner, output_name, parity_batches,
                            prepare, quiet, staged_file, tolerance)
from bnfold.export.report import ArtifactReport


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """`torch.jit.load` on CPU, without torch's deprecation warning on every call."""
    with quiet():
        return torch.jit.load(os.fspath(path), map_location="cpu")


def export_torchscript(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, *,
                       fold: bool = True, samples: torch.Tensor | None = None,
                       fp16: bool = False, verbose: bool = False) -> ArtifactReport:
    """Write `model` as a traced, frozen TorchScript file at `path`, verified before it is kept.

    Tracing (not scripting) because bnfold's folded modules are FX GraphModules and the models'
    forward methods use plain Python; the batch axis stays dynamic because the traced ops read
    it from the input. The loaded file is compared with the eval-mode `model` on `samples`.
    """
    start = time.perf_counter()
    prepared = prepare(model, fold=fold, fp16=fp16)
    exporter = "torch.jit.trace + torch.jit.freeze"
    with quiet(not verbose):  # torch.jit warns that it is deprecated on every call
        try:
            with torch.no_grad():
                traced = torch.jit.trace(prepared.module, example_input(spec, True))
                frozen = torch.jit.freeze(traced.eval())
        except Exception as exc:
            raise exporter_failure(exc, spec, "torch.jit.trace") from exc
    batches, source = parity_batches(spec, samples, dynamic_batch=True)
    with staged_file(path) as tmp:
        with quiet(not verbose):
            torch.jit.save(frozen, os.fspath(tmp))
        loaded = load_torchscript(tmp)
        with torch.no_grad():
            parity = bnfold.compare(prepared.reference, float32_runner(loaded), batches)
        tol = tolerance(fp16)
        parity.check(tol, f"TorchScript export of {spec.arch} ({prepared.dtype})")
        size = tmp.stat().st_size
    return ArtifactReport(format="torchscript", path=Path(path), exporter=exporter,
                          dtype=prepared.dtype, dynamic_batch=True, folded=fold, parity=parity,
                          tolerance=tol, parity_inputs=source, size_bytes=size,
                          seconds=time.perf_counter() - start, output_name=output_name(spec),
                          fold_report=prepared.fold_report)


__all__ = ["export_torchscript", "load_torchscript"]
