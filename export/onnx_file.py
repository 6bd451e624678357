"""`bnfold export some.onnx`: an ONNX file from elsewhere becomes a served-ready model.onnx.

It is folded with `bnfold.fold_onnx` (checked in onnxruntime against the original), stamped
with a spec (the file's own, or one built from --labels/--mean/--std/--input-size/--grayscale)
so that `/predictions` can preprocess images for it, and written with export.json; the same
staged, all-or-nothing write as a checkpoint's export.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import onnx

from bnfold.models.loader import LoadedModel
from bnfold.onnx_fold import graph_inputs
from bnfold.models.spec import ModelSpec

from bnfold.export._common import FP32_RTOL
from bnfold.export.config import ExportConfig
from bnfold.export.errors import ExportError
from bnfold.export.onnx import count_ops, model_opset, set_metadata, spec_metadata
from bnfold.export.summary import ArtifactReport, ExportSummary
from bnfold.export.triton import check_model_name, staged_export


def export_onnx_file(loaded: LoadedModel, config: ExportConfig, formats: list[str]) -> ExportSummary:
    """Fold, stamp and verify the ONNX file `loaded.onnx_path` into `config.out` (model.onnx + export.json)."""
    from bnfold.fold_files import fold_onnx_file

    if not set(formats) <= {"onnx", "int8"}:
        others = ", ".join(f for f in formats if f not in ("onnx", "int8"))
        raise ExportError(f"{loaded.source} is an ONNX file: it exports to onnx (folded, with a spec) and int8 "
                          f"only; {others} need(s) a PyTorch model: pass --format onnx or onnx,int8")
    if config.fp16 or config.legacy_onnx or config.opset is not None or not config.fold:
        raise ExportError("--fp16, --legacy-onnx, --opset and --no-fold apply to exporting a PyTorch model; "
                          f"{loaded.source} is already ONNX")
    if config.triton_repo is not None and "onnx" not in formats:
        raise ExportError("a Triton repository needs the onnx format: add onnx to the formats")
    start = time.perf_counter()
    spec = loaded.spec_with(config.spec_options)
    shape = loaded.require_shape()
    if config.spec_options is not None and config.spec_options.input_size is not None:
        shape = (shape[0], *spec.input_shape)
    out_dir = Path(config.out)
    triton_target = None
    if config.triton_repo is not None:
        triton_target = Path(config.triton_repo) / check_model_name(config.triton_name or spec.arch)
        if triton_target.exists() and not config.force:
            raise ExportError(f"Triton model folder {str(triton_target)!r} already exists; pass --force to replace it")
    with staged_export(out_dir, triton_target) as staged:
        target = staged.folder / "model.onnx"
        outcome = fold_onnx_file(loaded.onnx_path, target, input_shape=shape, rtol=FP32_RTOL)  # type: ignore[arg-type]
        proto = onnx.load(os.fspath(target))
        left = count_ops(proto, "BatchNormalization")
        if left:
            reasons = "; ".join(f"{name}: {why}" for name, why in outcome.report.skipped) or "no reason given"
            raise ExportError(f"{left} BatchNormalization node(s) of {loaded.source} could not be folded "
                              f"({reasons}); refusing to write an unfolded file")
        set_metadata(proto, {**spec_metadata(spec), "bnfold.folded": "true"})
        onnx.save(proto, os.fspath(target))
        graph_input = graph_inputs(proto)[0]
        first = graph_input.type.tensor_type.shape.dim[0] if graph_input.type.tensor_type.shape.dim else None
        artifact = ArtifactReport(
            format="onnx", path=out_dir / "model.onnx", exporter="bnfold.fold_onnx (the file was already ONNX)",
            dtype=onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type).name,
            dynamic_batch=first is not None and not first.HasField("dim_value"), folded=True,
            parity=outcome.parity, tolerance=FP32_RTOL,
            parity_inputs=f"random normal inputs of shape {list(outcome.input_shape)}",
            size_bytes=target.stat().st_size, seconds=time.perf_counter() - start,
            input_name=graph_input.name, output_name=proto.graph.output[0].name, opset=model_opset(proto),
            fold_report=outcome.report,
            notes=[f"BatchNormalization nodes: {outcome.batchnorm_before} before, 0 after"])
        artifacts = [artifact] if "onnx" in formats else []
        refused: list[tuple[str, Exception]] = []
        if "int8" in formats:
            # The folded, verified FP32 file is what INT8 quantizes; the gate keeps what passed.
            from bnfold.export.int8 import INT8_FILE, Int8GateError, export_int8

            if not artifact.dynamic_batch:
                raise ExportError(f"{loaded.source} has a fixed batch axis; INT8 is calibrated and gated on "
                                  "batches: export it with a dynamic batch axis, or pass --format onnx")
            try:
                artifacts.append(export_int8(None, spec, staged.folder / INT8_FILE, config=config.int8,
                                             data_root=config.data_root, fp32_onnx=target,
                                             verbose=config.verbose))
            except Int8GateError as exc:
                if not artifacts:
                    raise
                refused.append((INT8_FILE, exc))
            if "onnx" not in formats:
                target.unlink()
        for a in artifacts:
            a.path = out_dir / a.path.name
        if "onnx" in formats:
            staged.write_triton(target, spec, device=config.triton_device, dynamic_batch=artifact.dynamic_batch)
        summary = ExportSummary(out_dir=out_dir, checkpoint=Path(loaded.source), artifacts=artifacts,
                                fold_report=outcome.report, parity_inputs=artifact.parity_inputs,
                                export_json=out_dir / "export.json", triton_model_dir=triton_target,
                                source=loaded.description)
        data = summary.to_dict()
        data.update({"format": "bnfold-export", "format_version": 1, "source": loaded.description,
                     "spec": spec.to_dict(), "options": {"formats": formats},
                     "refused": [{"file": name, "reason": str(exc)} for name, exc in refused]})
        (staged.folder / "export.json").write_text(json.dumps(data, indent=2) + "\n")
    if refused:
        from bnfold.export.artifacts import PartialExportError

        written = ", ".join([a.path.name for a in artifacts] + ["export.json"])
        raise PartialExportError(f"wrote {out_dir} ({written}) but refused {refused[0][0]}: {refused[0][1]}",
                                 summary, refused)  # type: ignore[arg-type]
    return summary


def stamp_spec(path: str | os.PathLike, spec: ModelSpec) -> None:
    """Write `spec` into an ONNX file's metadata (as `bnfold export` does), so `bnfold serve` can preprocess images."""
    proto = onnx.load(os.fspath(path))
    set_metadata(proto, spec_metadata(spec))
    onnx.save(proto, os.fspath(path))


__all__ = ["export_onnx_file", "stamp_spec"]
