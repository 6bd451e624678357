"""torch.export writer: export with a dynamic batch Dim, save a .pt2, load back, verify."""
from __future__ import annotations

import os
from typing import Any
from pathlib import Path

import torch
from torch import nn

from bnfold.models.loader import load_batchnorms
from bnfold.models.spec import ModelSpec

from bnfold.export._common import FormatSteps, WriteOptions, batch_dynamic_shapes, float32_runner, write_verified
from bnfold.export.config import ExportConfig
from bnfold.export.summary import ArtifactReport


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """`torch.export.load` of a `.pt2` file."""
    return torch.export.load(os.fspath(path))


def export_program(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, *,
                   fold: bool = True, samples: torch.Tensor | None = None,
                   dynamic_batch: bool = True, fp16: bool = False,
                   verbose: bool = False, rtol: float | None = None, batchnorms: Any = None) -> ArtifactReport:
    """Write `model` as a `torch.export` program (`.pt2`) at `path`, verified before it is kept.

    The batch axis is a `torch.export.Dim` unless `dynamic_batch=False` (then batch 1). The
    saved file is loaded back with `torch.export.load` and its `.module()` is compared with the
    eval-mode `model` on `samples`.
    """
    def export(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
        return torch.export.export(module, (example,), dynamic_shapes=batch_dynamic_shapes(dynamic_batch))

    steps = FormatSteps("program", "torch.export.export", "torch.export program of {arch} ({dtype})", export,
                        save=lambda program, tmp: torch.export.save(program, os.fspath(tmp)),
                        load=lambda tmp: float32_runner(load_program(tmp).module()),
                        static_batch_hint=True)
    report, _ = write_verified(model, spec, path, steps, WriteOptions(fold, fp16, dynamic_batch, verbose, rtol, batchnorms),
                               samples)
    return report


def export_from_config(model: nn.Module, spec: ModelSpec, path: Path, config: ExportConfig,
                       samples: torch.Tensor | None) -> ArtifactReport:
    """`export_program` with an `ExportConfig`'s options."""
    return export_program(model, spec, path, fold=config.fold, samples=samples,
                          dynamic_batch=config.dynamic_batch, fp16=config.fp16, verbose=config.verbose,
                          rtol=config.rtol, batchnorms=load_batchnorms(config.batchnorm))


__all__ = ["export_program", "load_program"]
