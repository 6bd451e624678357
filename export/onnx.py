"""ONNX writer: fold, export (dynamo or legacy exporter), check, stamp the spec, verify, write."""
from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

import bnfold
from bnfold import sessions
from bnfold.onnx_fold import load_onnx
from bnfold.models.loader import load_batchnorms
from bnfold.models.spec import SPEC_METADATA_KEY, ModelSpec, SpecVersionError
from bnfold.versions import __version__

from bnfold.export._common import (FormatSteps, WriteOptions, batch_dynamic_shapes, output_name, staged_file,
                                   unsupported_op, write_verified)
from bnfold.export.config import ExportConfig
from bnfold.export.errors import ExportError, OpsetError
from bnfold.export.summary import ArtifactReport

INPUT_NAME = "input"
VERSION_METADATA_KEY = "bnfold.version"

try:  # torch's own bounds, when this torch exposes them
    from torch.onnx import _constants as _torch_onnx_constants
    _MAX_OPSET = int(_torch_onnx_constants.ONNX_MAX_OPSET)
    _LEGACY_MAX_OPSET = int(_torch_onnx_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
except (ImportError, AttributeError):  # pragma: no cover - other torch versions
    _MAX_OPSET, _LEGACY_MAX_OPSET = 23, 20

# The dynamo exporter's torchlib is written for opset 18 and up; below that it runs a
# best-effort version converter, so we refuse instead. The legacy exporter goes down to 7,
# but below 9 it needs initializers as graph inputs, which onnx.checker rejects.
DYNAMO_OPSETS = (18, _MAX_OPSET)
LEGACY_OPSETS = (9, _LEGACY_MAX_OPSET)


def supported_opsets(legacy_onnx: bool = False) -> tuple[int, int]:
    """The inclusive opset range accepted for the chosen exporter."""
    return LEGACY_OPSETS if legacy_onnx else DYNAMO_OPSETS


def check_opset(opset: int | None, legacy_onnx: bool = False) -> None:
    if opset is None:
        return
    low, high = supported_opsets(legacy_onnx)
    if not isinstance(opset, int) or not low <= opset <= high:
        which = "legacy (TorchScript-based)" if legacy_onnx else "dynamo"
        raise OpsetError(f"ONNX opset {opset!r} is outside the range the {which} exporter supports: "
                         f"{low} to {high}")


def bnfold_version() -> str:
    """The version stamped into the ONNX metadata (looked up once, in `bnfold.versions`)."""
    return __version__


# ---------------------------------------------------------------------------------------------
# Graph inspection


def _graphs(model: onnx.ModelProto):
    """Every graph in the model: the main one, subgraphs in attributes, local functions."""
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        yield graph.node
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    for function in model.functions:
        yield function.node


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """How many nodes of `op_type` the model holds, subgraphs and functions included."""
    return sum(1 for nodes in _graphs(model) for node in nodes if node.op_type == op_type)


def model_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def spec_metadata(spec: ModelSpec) -> dict[str, str]:
    """The entries every ONNX file bnfold writes carries: its spec (which the server preprocesses
    images by) and the bnfold version that wrote it."""
    return {SPEC_METADATA_KEY: spec.to_json(), VERSION_METADATA_KEY: bnfold_version()}


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set `metadata_props` entries, replacing any with the same key."""
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for prop in kept:
        model.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def read_spec(model_or_path: onnx.ModelProto | str | os.PathLike) -> ModelSpec:
    """The model spec stamped into an exported ONNX file's metadata."""
    model = (model_or_path if isinstance(model_or_path, onnx.ModelProto)
             else load_onnx(model_or_path, load_external_data=False, error=ExportError))
    props = {p.key: p.value for p in model.metadata_props}
    if SPEC_METADATA_KEY not in props:
        raise ExportError(f"the ONNX model has no {SPEC_METADATA_KEY!r} metadata entry: "
                          "it was not written by bnfold export")
    try:
        return ModelSpec.from_json(props[SPEC_METADATA_KEY])
    except SpecVersionError as exc:
        where = f"{str(model_or_path)!r}: " if not isinstance(model_or_path, onnx.ModelProto) else ""
        raise SpecVersionError(f"{where}{exc}") from None


# ---------------------------------------------------------------------------------------------
# Export


def _run_exporter(module: nn.Module, example: torch.Tensor, out: str, *, opset: int | None,
                  dynamic_batch: bool, legacy_onnx: bool, verbose: bool = False) -> onnx.ModelProto:
    if legacy_onnx:
        buffer = io.BytesIO()
        dynamic_axes = {INPUT_NAME: {0: "batch"}, out: {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[out], opset_version=opset, dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
        return onnx.load_from_string(buffer.getvalue())
    dynamic_shapes = batch_dynamic_shapes(dynamic_batch)
    program = torch.onnx.export(module, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                output_names=[out], opset_version=opset,
                                dynamic_shapes=dynamic_shapes, optimize=True,
                                # None: the exporter's progress lines; False: silence.
                                verbose=None if verbose else False)
    return program.model_proto


def _remove_batchnorm(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Fold whatever BatchNormalization the exporter left; refuse a file that still has some."""
    left = count_ops(model, "BatchNormalization")
    if left == 0:
        return model
    model, report = bnfold.fold_onnx(model)
    notes.append(f"bnfold.fold_onnx folded {len(report.folded)} BatchNormalization node(s) "
                 "left in the exported graph")
    still = count_ops(model, "BatchNormalization")
    if still:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.skipped) or "no reason given"
        raise ExportError(f"{still} BatchNormalization node(s) remain in the ONNX graph after "
                          f"bnfold.fold_onnx ({reasons}); refusing to write an unfolded file")
    return model


def cpu_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """A CPU onnxruntime session with `threads` intra-op threads (default: torch's thread count)."""
    return sessions.cpu_session(path, threads or torch.get_num_threads())


def export_onnx(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, *, fold: bool = True,
                opset: int | None = None, dynamic_batch: bool = True, fp16: bool = False,
                legacy_onnx: bool = False, samples: torch.Tensor | None = None,
                verbose: bool = False, rtol: float | None = None, batchnorms: Any = None) -> ArtifactReport:
    """Write `model` as a verified ONNX file at `path`.

    The file has zero BatchNormalization nodes, input `input`, output `logits` (`mask` for
    segmentation), a dynamic batch axis unless `dynamic_batch=False` (then batch 1), and the
    spec JSON in `metadata_props`. With `fp16`, weights are float16 and the graph casts at its
    float32 edges. It is written only after onnxruntime (CPU) matched the eval-mode `model` on
    `samples` (random inputs of the spec's shape when None); otherwise `bnfold.ParityError`.
    """
    check_opset(opset, legacy_onnx)
    out = output_name(spec)
    notes: list[str] = []

    def export(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
        proto = _run_exporter(module, example, out, opset=opset, dynamic_batch=dynamic_batch,
                              legacy_onnx=legacy_onnx, verbose=verbose)
        proto = _remove_batchnorm(proto, notes)
        _check_io(proto, out)
        set_metadata(proto, {**spec_metadata(spec), "bnfold.folded": str(fold).lower(),
                             "bnfold.weights_dtype": "float16" if fp16 else "float32"})
        try:
            onnx.checker.check_model(proto, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"onnx.checker rejected the exported {spec.arch} model: {exc}") from exc
        return proto

    steps = FormatSteps("onnx", f"torch.onnx.export(dynamo={not legacy_onnx})",
                        "ONNX export of {arch} ({dtype}, onnxruntime CPU)", export,
                        save=lambda proto, tmp: onnx.save_model(proto, os.fspath(tmp)), load=cpu_session,
                        static_batch_hint=True)
    report, proto = write_verified(model, spec, path, steps, WriteOptions(fold, fp16, dynamic_batch, verbose, rtol,
                                                                               batchnorms),
                                   samples)
    report.input_name, report.opset, report.notes = INPUT_NAME, model_opset(proto), notes
    # The fold and the parity check travel with the file for readers without the checkpoint
    # (the cards of `bnfold serve`'s page): stamped on the verified graph, written the same
    # staged way. Only metadata changes; the graph and weights are the ones just compared.
    proof = {"bnfold.parity": json.dumps(report.parity.to_dict())}
    if report.fold_report is not None:
        proof["bnfold.fold"] = json.dumps({"folded": len(report.fold_report.folded),
                                           "skipped": report.fold_report.to_dict()["skipped"]})
    set_metadata(proto, proof)
    with staged_file(path) as tmp:
        onnx.save_model(proto, os.fspath(tmp))
    report.size_bytes = Path(path).stat().st_size
    return report


def export_from_config(model: nn.Module, spec: ModelSpec, path: Path, config: ExportConfig,
                       samples: torch.Tensor | None) -> ArtifactReport:
    """`export_onnx` with the options of an `ExportConfig` (the entry in `export.WRITERS`)."""
    return export_onnx(model, spec, path, fold=config.fold, opset=config.opset,
                       dynamic_batch=config.dynamic_batch, fp16=config.fp16, legacy_onnx=config.legacy_onnx,
                       samples=samples, verbose=config.verbose, rtol=config.rtol,
                       batchnorms=load_batchnorms(config.batchnorm))


def _check_io(model: onnx.ModelProto, out: str) -> None:
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != [out]:
        raise ExportError(f"the exported graph has inputs {inputs} and outputs {outputs}; expected "
                          f"[{INPUT_NAME!r}] and [{out!r}] (a model with one tensor in and one out)")


def export_fp16_from_config(model: nn.Module, spec: ModelSpec, path: Path, config: ExportConfig,
                            samples: torch.Tensor | None) -> ArtifactReport:
    """The ONNX writer with float16 weights whatever `config.fp16` says, so that one run can
    write FP32, FP16 and INT8 files side by side (`--format onnx,fp16,int8`)."""
    report = export_from_config(model, spec, path, dataclasses.replace(config, fp16=True), samples)
    report.format = "fp16"
    return report


__all__ = ["export_onnx", "export_fp16_from_config", "read_spec", "count_ops", "cpu_session", "supported_opsets", "check_opset",
           "unsupported_op", "DYNAMO_OPSETS", "LEGACY_OPSETS"]
