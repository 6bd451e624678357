"""torch.export writer: export with a dynamic batch Dim, save a .pt2, load back, verify."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

import bnfold
from bnfold.models.spec import ModelSpec

from bnfold.export._common import (batch_dynamic_shapes, example_input, exporter_failure, float32_runner,
                            output_name, parity_batches, prepare, quiet, staged_file, tolerance)
from bnfold.export.report import ArtifactReport


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """`torch.export.load` of a `.pt2` file."""
    return torch.export.load(os.fspath(path))


def export_program(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, *,
                   fold: bool = True, samples: torch.Tensor | None = None,
                   dynamic_batch: bool = True, fp16: bool = False,
                   verbose: bool = False) -> ArtifactReport:
    """Write `model` as a `torch.export` program (`.pt2`) at `path`, verified before it is kept.

    The batch axis is a `torch.export.Dim` unless `dynamic_batch=False` (then batch 1). The
    saved file is loaded back with `torch.export.load` and its `.module()` is compared with the
    eval-mode `model` on `samples`.
    """
    start = time.perf_counter()
    prepared = prepare(model, fold=fold, fp16=fp16)
    dynamic_shapes = batch_dynamic_shapes(dynamic_batch)
    with quiet(not verbose):
        try:
            program = torch.export.export(prepared.module, (example_input(spec, dynamic_batch),),
                                          dynamic_shapes=dynamic_shapes)
        except Exception as exc:
            raise exporter_failure(exc, spec, "torch.export.export", dynamic_batch) from exc
    batches, source = parity_batches(spec, samples, dynamic_batch=dynamic_batch)
    with staged_file(path) as tmp:
        with quiet(not verbose):
            torch.export.save(program, os.fspath(tmp))
            loaded = load_program(tmp).module()
        with torch.no_grad():
            parity = bnfold.compare(prepared.reference, float32_runner(loaded), batches)
        tol = tolerance(fp16)
        parity.check(tol, f"torch.export program of {spec.arch} ({prepared.dtype})")
        size = tmp.stat().st_size
    return ArtifactReport(format="program", path=Path(path), exporter="torch.export.export",
                          dtype=prepared.dtype, dynamic_batch=dynamic_batch, folded=fold,
                          parity=parity, tolerance=tol, parity_inputs=source, size_bytes=size,
                          seconds=time.perf_counter() - start, output_name=output_name(spec),
                          fold_report=prepared.fold_report)


__all__ = ["export_program", "load_program"]
