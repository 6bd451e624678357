"""TorchScript writer: trace, freeze, save, load back, verify. The file needs only torch."""
from __future__ import annotations

import os
from typing import Any
from pathlib import Path

import torch
from torch import nn

from bnfold.models.loader import load_batchnorms
from bnfold.models.spec import ModelSpec

from bnfold.export._common import FormatSteps, WriteOptions, float32_runner, quiet, write_verified
from bnfold.export.config import ExportConfig
from bnfold.export.summary import ArtifactReport


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """`torch.jit.load` on CPU, without torch's deprecation warning on every call."""
    with quiet():
        return torch.jit.load(os.fspath(path), map_location="cpu")


def export_torchscript(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, *,
                       fold: bool = True, samples: torch.Tensor | None = None,
                       fp16: bool = False, verbose: bool = False, rtol: float | None = None,
                       batchnorms: Any = None) -> ArtifactReport:
    """Write `model` as a traced, frozen TorchScript file at `path`, verified before it is kept.

    Tracing (not scripting) because bnfold's folded modules are FX GraphModules and the models'
    forward methods use plain Python; the batch axis stays dynamic because the traced ops read
    it from the input. The loaded file is compared with the eval-mode `model` on `samples`.
    """
    def export(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
        with torch.no_grad():
            return torch.jit.freeze(torch.jit.trace(module, example).eval())

    steps = FormatSteps("torchscript", "torch.jit.trace + torch.jit.freeze",
                        "TorchScript export of {arch} ({dtype})", export,
                        save=lambda frozen, tmp: torch.jit.save(frozen, os.fspath(tmp)),
                        load=lambda tmp: float32_runner(load_torchscript(tmp)))
    report, _ = write_verified(model, spec, path, steps, WriteOptions(fold, fp16, True, verbose, rtol, batchnorms), samples)
    return report


def export_from_config(model: nn.Module, spec: ModelSpec, path: Path, config: ExportConfig,
                       samples: torch.Tensor | None) -> ArtifactReport:
    """`export_torchscript` with an `ExportConfig`'s options; the batch axis is always dynamic."""
    return export_torchscript(model, spec, path, fold=config.fold, samples=samples, fp16=config.fp16,
                              verbose=config.verbose, rtol=config.rtol,
                              batchnorms=load_batchnorms(config.batchnorm))


__all__ = ["export_torchscript", "load_torchscript"]
