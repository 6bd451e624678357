"""`export_model(ExportConfig)`: every requested artifact of one model, all verified, or none written.

Artifacts are written into a hidden folder beside `out_dir`; only when every one of them has
passed its parity check (and the Triton model folder is complete) are they renamed into place.
A failure removes the staging folders and leaves `out_dir` (and the Triton repository) as it was.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bnfold import models
from bnfold.models.loader import LoadedModel, is_onnx_file, load_model
from bnfold.models.spec import ModelSpec

from bnfold.export.config import DEFAULT_FORMATS, ExportConfig
from bnfold.export.errors import ExportError, OutputExistsError
from bnfold.export.onnx import bnfold_version, check_opset
from bnfold.versions import package_version
from bnfold.progress import progress as progress_bar
from bnfold.export.summary import ExportSummary
from bnfold.export.int8 import Int8GateError
from bnfold.export.writers import WRITERS
from bnfold.export.triton import check_model_name, default_model_name, staged_export

class PartialExportError(ExportError):
    """Some artifacts were written and one was refused by its gate (INT8): the message names both;
    `summary` is what was written, `refused` the (file name, gate error) pairs."""

    def __init__(self, message: str, summary: ExportSummary, refused: list[tuple[str, Int8GateError]]) -> None:
        super().__init__(message)
        self.summary, self.refused = summary, refused


# Dataset samples used for the parity check when the checkpoint's dataset is available.
PARITY_SAMPLES = 32


def _check_target(path: Path, force: bool, what: str) -> None:
    if path.exists() and not force and not (path.is_dir() and not any(path.iterdir())):
        raise OutputExistsError(f"{what} {str(path)!r} already exists; pass --force (from Python: force=True) "
                                "to replace it")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{what} {str(path)!r} exists and is not a folder")


def _load_source(config: ExportConfig) -> LoadedModel:
    """Whatever `config.source` is (models.loader): a checkpoint, a state_dict, a pickle, ONNX, ..."""
    return load_model(config.source, model_class=config.model_class, model_args=config.model_args,
                      weights=config.weights, trust_pickle=config.trust_pickle, input_shape=config.input_shape)


def _parity_samples(spec: ModelSpec, data_root: str | os.PathLike,
                    own_data: str | os.PathLike | None = None) -> tuple[torch.Tensor | None, str]:
    if not spec.dataset and own_data is not None:  # the user's own images or arrays (--eval/calibration-data)
        from bnfold.export.user_data import load_user_data

        data = load_user_data(own_data, spec)
        return torch.from_numpy(data.inputs[:PARITY_SAMPLES]), f"{min(data.samples, PARITY_SAMPLES)} of {data.source}"
    if not spec.dataset:  # a model from elsewhere: bnfold knows no data for it
        return None, "random normal inputs (no dataset is known for this model)"
    samples = models.sample_inputs(spec, PARITY_SAMPLES, data_root=str(data_root))
    if samples is None:
        return None, f"random normal inputs (the {spec.dataset!r} dataset is not available)"
    return samples, f"{samples.shape[0]} eval-split samples of {spec.dataset!r}"


def _export_json(summary: ExportSummary, spec: ModelSpec, options: dict[str, Any]) -> dict[str, Any]:
    data = summary.to_dict()
    for artifact in data["artifacts"]:
        # Every artifact came from the same fold; it is recorded once, at the top.
        artifact.pop("fold_report", None)
    data.update({
        "format": "bnfold-export",
        "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "spec": spec.to_dict(),
        "versions": {"bnfold": bnfold_version(), "torch": torch.__version__,
                     "onnx": package_version("onnx") or "unknown",
                     "onnxruntime": package_version("onnxruntime") or "unknown"},
    })
    return data


def _progress(items: Sequence[str], enabled: bool) -> Iterator[str]:
    """Yield the formats, showing which one is being exported (the ONNX one takes seconds)."""
    with progress_bar(total=len(items), desc="export", unit="file", enabled=enabled) as bar:
        for item in items:
            bar.set_description(f"export {WRITERS[item].file_name}")
            yield item
            bar.update(1)


def export_model(config: ExportConfig) -> ExportSummary:
    """Export a bnfold checkpoint to `config.out` (`model.onnx`, `model.ts`, `model.pt2`,
    `export.json`), each artifact verified against the checkpoint's eval-mode model.

    Parity inputs are `PARITY_SAMPLES` eval-split samples of the checkpoint's dataset when
    `models.sample_inputs` finds them under `config.data_root`, else random inputs of the spec's
    shape. With `config.triton_repo`, the ONNX file is also added to that Triton model repository
    as `<triton_name or arch>/1/model.onnx` with its `config.pbtxt`.
    """
    # Every format the model can go to unless told (an ONNX file only stays ONNX); the config
    # checked and normalized given ones when it was made.
    fmts = list(config.formats) if config.formats is not None else (
        ["onnx"] if is_onnx_file(config.source) else list(DEFAULT_FORMATS))
    check_opset(config.opset, config.legacy_onnx)
    checkpoint, out_dir = Path(config.source), Path(config.out)
    _check_target(out_dir, config.force, "output folder")
    if config.triton_repo is not None and "onnx" not in fmts:
        raise ExportError("a Triton repository needs the onnx format: add onnx to the formats")
    if out_dir.exists() and checkpoint.resolve().is_relative_to(out_dir.resolve()):
        # --force replaces the folder as a whole: it would delete the checkpoint it exports.
        raise OutputExistsError(f"output folder {str(out_dir)!r} holds the checkpoint "
                                f"{str(checkpoint)!r}; choose a subfolder such as {str(out_dir / 'export')!r}")
    loaded = _load_source(config)
    if loaded.kind == "onnx":  # an ONNX file from elsewhere: fold it, stamp the spec, verify
        from bnfold.export.onnx_file import export_onnx_file

        return export_onnx_file(loaded, config, fmts)
    model, spec = loaded.require_module("export"), loaded.spec_with(config.spec_options)
    triton_target = None
    if config.triton_repo is not None:
        triton_name = check_model_name(config.triton_name or default_model_name(spec))
        triton_target = Path(config.triton_repo) / triton_name
        _check_target(triton_target, config.force, "Triton model folder")
    samples, source = _parity_samples(spec, config.data_root, config.int8.eval_data or config.int8.calibration_data)

    # Everything is written into hidden folders and moved into place only once all of it passed.
    # A failed INT8 gate refuses that file alone: the verified files are still written, and the
    # refusal is raised after they are in place (exit 2), naming both.
    refused: list[tuple[str, Int8GateError]] = []
    with staged_export(out_dir, triton_target) as staged:
        artifacts = []
        for fmt in _progress(fmts, config.progress):
            try:
                artifacts.append(WRITERS[fmt].write(model, spec, staged.folder / WRITERS[fmt].file_name, config,
                                                    samples))
            except Int8GateError as exc:
                refused.append((WRITERS[fmt].file_name, exc))
        if not artifacts:
            raise refused[0][1]
        staged.write_triton(staged.folder / WRITERS["onnx"].file_name, spec, device=config.triton_device,
                            dynamic_batch=config.dynamic_batch)
        for a in artifacts:
            if a.format != "int8":  # INT8 is compared on its gate's inputs, which it names itself
                a.parity_inputs = source
            a.path = out_dir / a.path.name
        fold_report = next((a.fold_report for a in artifacts if a.fold_report is not None), None)
        summary = ExportSummary(out_dir=out_dir, checkpoint=checkpoint, artifacts=artifacts,
                                fold_report=fold_report, parity_inputs=source,
                                export_json=out_dir / "export.json",
                                triton_model_dir=triton_target, source=loaded.description)
        options = {"formats": fmts, "fold": config.fold, "opset": config.opset,
                   "dynamic_batch": config.dynamic_batch, "fp16": config.fp16,
                   "legacy_onnx": config.legacy_onnx, "triton_device": config.triton_device}
        record = _export_json(summary, spec, options)
        record["refused"] = [{"file": name, "reason": str(exc)} for name, exc in refused]
        (staged.folder / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    if refused:
        written = ", ".join([a.path.name for a in artifacts] + ["export.json"])
        name, exc = refused[0]
        raise PartialExportError(f"wrote {out_dir} ({written}) but refused {name}: {exc}", summary, refused)
    return summary


def export_checkpoint(config: ExportConfig) -> ExportSummary:
    """The first name of `export_model`, which exports any model `config.source` names (ONNX files,
    state_dicts, timm:NAME ...), not only checkpoints; kept for code that calls it, with a warning."""
    warnings.warn("bnfold.export.export_checkpoint is now export_model (it exports any model, not only "
                  "checkpoints)", DeprecationWarning, stacklevel=2)
    return export_model(config)


__all__ = ["export_model", "export_checkpoint", "PartialExportError", "PARITY_SAMPLES"]
