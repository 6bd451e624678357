"""INT8 writer: fold, export FP32 ONNX, calibrate on the training split, quantize, gate on accuracy.

    report = export_int8(model, spec, "out/model.int8.onnx", config=Int8Config(calibration="minmax"))

The steps, each one a plain call:
1. fold in float64 and export a verified FP32 ONNX file (`export.onnx.export_onnx`), or reuse one;
2. onnxruntime's `quant_pre_process` (shape inference and graph optimization);
3. `quantize_static` in QDQ format: per-channel int8 weights, uint8 activations on x86 (int8 on
   ARM), ranges calibrated on `calibration_samples` images of the checkpoint's own *training*
   split through the spec's eval preprocessing. The eval split is never used for calibration:
   it is what the gate measures;
4. the gate: FP32 ONNX and INT8 both run over the whole eval split; when the INT8 metric is more
   than `max_accuracy_drop` points below the FP32 one, `AccuracyGateError` says both figures and
   what to try, and no file is written.

`reduce_range` (7-bit weights) is chosen from the CPU's flags as onnxruntime's guidance says:
on x86 without VNNI the uint8 x int8 products saturate 16-bit intermediates, so weights lose a
bit; with VNNI (or AMX), or on ARM, they keep all 8. Without VNNI the report notes that INT8
may not be faster than FP32 there.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

import bnfold
from bnfold.models.spec import ModelSpec
from bnfold.models.metrics import task_metric
from bnfold.versions import cpu_name

from bnfold.export._common import first_line, output_name, quiet, staged_file
from bnfold.export.errors import ExportError
from bnfold.export.evaluate import (EvalSplit, load_eval_split, onnx_session, score,
                                    session_runner)
from bnfold.export.onnx import (INPUT_NAME, count_ops, export_onnx, model_opset, set_metadata,
                                spec_metadata)
from bnfold.export.summary import ArtifactReport

if TYPE_CHECKING:
    from bnfold.export.config import ExportConfig

INT8_FILE = "model.int8.onnx"
CALIBRATIONS: tuple[str, ...] = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES: tuple[str, ...] = ("uint8", "int8")
DEFAULT_CALIBRATION_SAMPLES = 256
DEFAULT_MAX_ACCURACY_DROP = 1.0   # points (percent of the eval split)
CALIBRATION_BATCH = 16
# The percentile calibrator's default cut (onnxruntime's own default is 99.999).
PERCENTILE = 99.999
# CPU flags that decide the int8 kernels: VNNI (or AMX) gives 8-bit dot products without
# the 16-bit saturation of the older AVX2/AVX-512BW path.
CPU_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# The layers onnxruntime quantizes as "the" compute of a CNN; one left float is listed.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QUANT_METADATA_KEY = "bnfold.quantization"


class AccuracyGateError(ExportError):
    """The INT8 model lost more accuracy against FP32 than allowed; nothing was written."""

    def __init__(self, message: str, *, fp32: float, int8: float, drop_points: float) -> None:
        super().__init__(message)
        self.fp32, self.int8, self.drop_points = fp32, int8, drop_points


# ---------------------------------------------------------------------------------------------
# The CPU


@dataclass(frozen=True)
class CpuInt8Support:
    """What this CPU offers for int8 and the quantization settings chosen from it."""

    machine: str
    flags: tuple[str, ...]       # the int8-relevant flags present (see CPU_FLAGS)
    vnni: bool
    reduce_range: bool
    activation_type: str
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpuinfo_flags(text: str) -> set[str]:
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("flags", "features"):  # x86 says flags, ARM says Features
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_int8_support(cpuinfo: str | None = None, machine: str | None = None) -> CpuInt8Support:
    """Read /proc/cpuinfo (or the given text) and choose reduce_range and the activation type."""
    machine = (machine or platform.machine()).lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no flags to read
            cpuinfo = ""
    present = _cpuinfo_flags(cpuinfo)
    flags = tuple(f for f in CPU_FLAGS if f in present)
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        dot = "asimddp" in present
        return CpuInt8Support(machine, flags + (("asimddp",) if dot else ()), dot, False, "int8",
                              "ARM: symmetric int8 activations, full-range weights (onnxruntime's ARM guidance)")
    vnni = any(f in present for f in VNNI_FLAGS)
    if vnni:
        which = "AMX" if "amx_int8" in present else "VNNI"
        return CpuInt8Support(machine, flags, True, False, "uint8",
                              f"x86 with {which}: uint8 activations, int8 weights, full 8-bit range")
    return CpuInt8Support(machine, flags, False, True, "uint8",
                          "x86 without VNNI: weights quantized to 7 bits (reduce_range) to avoid "
                          "saturating 16-bit intermediates; INT8 may not be faster than FP32 on this CPU")


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class Int8Config:
    """How to quantize and how much accuracy may be lost."""

    calibration: str = "minmax"                      # minmax, percentile or entropy
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP   # points
    per_channel: bool = True                         # False: one scale per weight tensor
    reduce_range: bool | None = None                 # None: from the CPU's flags
    activation_type: str | None = None               # "uint8" or "int8"; None: from the CPU
    seed: int = 0                                    # which training samples calibrate

    def check(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ExportError(f"unknown calibration method {self.calibration!r}; choose from: "
                              f"{', '.join(CALIBRATIONS)}")
        if self.calibration_samples < 1:
            raise ExportError(f"calibration samples must be at least 1, got {self.calibration_samples}")
        if not self.max_accuracy_drop >= 0:
            raise ExportError(f"max accuracy drop must be 0 or more points, got {self.max_accuracy_drop}")
        if self.activation_type is not None and self.activation_type not in ACTIVATION_TYPES:
            raise ExportError(f"unknown activation type {self.activation_type!r}; choose from: "
                              f"{', '.join(ACTIVATION_TYPES)}")


# ---------------------------------------------------------------------------------------------
# Calibration data


def calibration_inputs(spec: ModelSpec, samples: int, data_root: str | os.PathLike = "data",
                       seed: int = 0) -> tuple[np.ndarray, str]:
    """`samples` training-split images (fewer if the split is smaller) through the spec's eval
    preprocessing, drawn at random with `seed`, and where they came from."""
    from bnfold import models

    try:
        train, _ = models.load_datasets(spec, str(data_root), download=False, augment=False)
    except models.DatasetError as exc:
        raise ExportError(f"INT8 calibration needs the training split of {spec.dataset!r}: {exc}") from None
    count = min(samples, len(train))
    if count == 0:
        raise ExportError(f"the training split of {spec.dataset!r} is empty: nothing to calibrate on")
    picks = np.random.default_rng(seed).choice(len(train), size=count, replace=False)
    inputs = np.stack([np.asarray(train[int(i)][0], dtype=np.float32) for i in sorted(picks)])
    return inputs, f"{count} training-split samples of {spec.dataset!r} (seed {seed})"


def check_calibration_data(spec: ModelSpec, data: np.ndarray | torch.Tensor) -> np.ndarray:
    """Given calibration inputs as float32 (N, C, H, W) of the spec's shape."""
    array = np.asarray(data.detach().cpu() if isinstance(data, torch.Tensor) else data, dtype=np.float32)
    expected = tuple(spec.input_shape)
    if array.ndim == len(expected):  # one sample without its batch axis
        array = array[None]
    if array.ndim != len(expected) + 1 or tuple(array.shape[1:]) != expected or array.shape[0] == 0:
        raise ExportError(f"calibration data has shape {list(array.shape)}, expected "
                          f"[N, {', '.join(map(str, expected))}] with N >= 1 from the spec")
    if not np.isfinite(array).all():
        raise ExportError("calibration data holds NaN or infinite values")
    return np.ascontiguousarray(array)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an in-memory array, in small batches."""

    def __init__(self, inputs: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._batches = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return {INPUT_NAME: self._batches[self._next - 1]}


# ---------------------------------------------------------------------------------------------
# Quantizing


@dataclass
class Quantized:
    """What quantize_onnx did to the graph."""

    float_layers: list[str]        # compute layers left in float (name (op type))
    quantized_layers: int
    quantize_nodes: int
    dequantize_nodes: int


def _float_layers(model: onnx.ModelProto) -> tuple[list[str], int]:
    """Compute layers whose weight is not fed by a DequantizeLinear (they run in float)."""
    produced_by = {out: node for node in model.graph.node for out in node.output}
    left, done = [], 0
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        producer = produced_by.get(weight)
        if producer is not None and producer.op_type == "DequantizeLinear":
            done += 1
        else:
            left.append(f"{node.name or node.output[0]} ({node.op_type})")
    return left, done


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray, *,
                  method: str = "minmax", per_channel: bool = True, reduce_range: bool = False,
                  activation_type: str = "uint8", verbose: bool = False) -> Quantized:
    """Pre-process and statically quantize an FP32 ONNX file (QDQ, int8 weights) into `out_path`."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    out_path = Path(out_path)
    pre = out_path.with_name(out_path.stem + ".pre.onnx")
    # Not CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops the collected
    # batches at that count without merging their ranges ("No data is collected"). MinMax keeps
    # only per-batch minima and maxima (reduced inside the graph); percentile and entropy hold
    # every activation of every calibration batch until the end: mind memory for big inputs.
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    with quiet(not verbose):
        try:
            # ONNX shape inference is enough for a CNN; onnxruntime's symbolic one is meant for
            # transformers, and when it gives up it dumps sym_shape_infer_temp.onnx into the cwd.
            quant_pre_process(os.fspath(fp32_path), os.fspath(pre), skip_symbolic_shape=True)
        except Exception as exc:  # its shape inference or optimizer may refuse a graph: go without
            shutil.copyfile(fp32_path, pre)
            if verbose:
                print(f"quant_pre_process skipped: {first_line(exc)}")
        try:
            quantize_static(
                os.fspath(pre), os.fspath(out_path), _Reader(calibration), quant_format=QuantFormat.QDQ,
                per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=methods[method], extra_options=extra)
        except Exception as exc:  # calibrators and quantizers raise many types
            raise ExportError(f"onnxruntime quantize_static ({method} calibration) failed: {first_line(exc)}; "
                              "try another --calibration (minmax is the most robust)") from exc
        finally:
            pre.unlink(missing_ok=True)
    model = onnx.load(os.fspath(out_path))
    left, done = _float_layers(model)
    return Quantized(left, done, count_ops(model, "QuantizeLinear"), count_ops(model, "DequantizeLinear"))


# ---------------------------------------------------------------------------------------------
# The gate


@dataclass
class Gate:
    """FP32 against INT8 on the whole eval split."""

    metric: str
    fp32: float
    int8: float
    drop_points: float
    max_drop_points: float
    samples: int
    dataset: str
    parity: "bnfold.Parity"
    mask_agreement: float | None = None   # segmentation: pixels with the same foreground call

    @property
    def passed(self) -> bool:
        return self.drop_points <= self.max_drop_points

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "fp32": self.fp32, "int8": self.int8, "drop_points": self.drop_points,
                "max_drop_points": self.max_drop_points, "eval_samples": self.samples, "dataset": self.dataset,
                "passed": self.passed, "mask_agreement": self.mask_agreement}


class _Recorder:
    """A runner that keeps what it returned, so one pass gives both the parity and the metric."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.outputs = runner, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(self.runner(x), dtype=np.float32)
        self.outputs.append(out)
        return out

    def all(self) -> np.ndarray:
        return np.concatenate(self.outputs)


def accuracy_gate(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, split: EvalSplit,
                  max_drop_points: float) -> Gate:
    """Run both files over the whole eval split; the drop is in points (100 x the metric's units)."""
    fp32 = _Recorder(session_runner(onnx_session(fp32_path)))
    int8 = _Recorder(session_runner(onnx_session(int8_path)))
    parity = bnfold.compare(fp32, int8, split.batches())
    ref, cand = fp32.all(), int8.all()
    fp32_value, int8_value = score(split.task, ref, split.targets), score(split.task, cand, split.targets)
    mask = float(((ref > 0) == (cand > 0)).mean()) if split.task == "segmentation" else None
    return Gate(task_metric(split.task), fp32_value, int8_value, round((fp32_value - int8_value) * 100, 6),
                max_drop_points, split.samples, split.dataset, parity, mask)


def _refusal(gate: Gate, config: Int8Config, calibration_source: str) -> AccuracyGateError:
    tips = []
    if config.calibration_samples < 1024:
        tips.append(f"more calibration samples (--calibration-samples {max(4 * config.calibration_samples, 512)})")
    others = [m for m in CALIBRATIONS if m != config.calibration]
    tips.append(f"another calibration method (--calibration {' or '.join(others)})")
    tips.append("per-tensor weights (--per-tensor)" if config.per_channel else "per-channel weights (drop --per-tensor)")
    tips.append(f"or allow a larger drop (--max-accuracy-drop, now {config.max_accuracy_drop:.1f} points)")
    return AccuracyGateError(
        f"INT8 {gate.metric} {gate.int8:.4f} is {gate.drop_points:.2f} points below FP32 {gate.fp32:.4f} on "
        f"the {gate.samples} eval samples of {gate.dataset!r} (allowed: {gate.max_drop_points:.1f}); "
        f"calibrated on {calibration_source} with {config.calibration}; no INT8 file was written. "
        f"Try {', '.join(tips)}",
        fp32=gate.fp32, int8=gate.int8, drop_points=gate.drop_points)


# ---------------------------------------------------------------------------------------------
# The writer


def export_int8(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, *,
                config: Int8Config | None = None, data_root: str | os.PathLike = "data",
                calibration_data: np.ndarray | torch.Tensor | None = None,
                eval_split: EvalSplit | None = None, fp32_onnx: str | os.PathLike | None = None,
                fold: bool = True, opset: int | None = None, legacy: bool = False,
                verbose: bool = False) -> ArtifactReport:
    """Write `model` as an accuracy-gated INT8 (QDQ) ONNX file at `path`.

    `calibration_data` replaces the training-split samples (an array of the spec's shape);
    `eval_split` and `fp32_onnx` let a caller that already has them skip loading or exporting
    again (`fp32_onnx` must be the folded FP32 export of the same model). Raises
    `AccuracyGateError` (and writes nothing) when the eval metric drops more than allowed.
    """
    config = config or Int8Config()
    config.check()
    if not spec.dataset and eval_split is None:
        # A model from elsewhere: bnfold knows no data to calibrate on nor to gate with.
        raise ExportError("INT8 needs the model's dataset: its training split calibrates and its eval split "
                          "gates the accuracy, and this model's spec names none; export INT8 from a bnfold "
                          "checkpoint (bnfold train --dataset ...)")
    start = time.perf_counter()
    path = Path(path)
    cpu = cpu_int8_support()
    reduce_range = cpu.reduce_range if config.reduce_range is None else config.reduce_range
    activation = config.activation_type or cpu.activation_type
    if calibration_data is None:
        calibration, calibration_source = calibration_inputs(spec, config.calibration_samples, data_root,
                                                             config.seed)
    else:
        calibration = check_calibration_data(spec, calibration_data)
        calibration_source = f"{len(calibration)} given samples"
    split = eval_split if eval_split is not None else load_eval_split(spec, data_root)
    notes = [cpu.note] if not cpu.vnni and cpu.machine in ("x86_64", "amd64") else []

    # The work folder is the system's temporary one: a refused export leaves nothing beside `path`.
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-") as work:
        work = Path(work)
        if fp32_onnx is None:
            # Parity inputs: real eval images, as export_checkpoint uses.
            fp32_report = export_onnx(model, spec, work / "model.onnx", fold=fold, opset=opset, legacy=legacy,
                                      samples=torch.from_numpy(split.inputs[:32]), verbose=verbose)
            fp32_onnx, fold_report = fp32_report.path, fp32_report.fold_report
        else:
            fold_report = None
        quantized_path = work / INT8_FILE
        quantized = quantize_onnx(fp32_onnx, quantized_path, calibration, method=config.calibration,
                                  per_channel=config.per_channel, reduce_range=reduce_range,
                                  activation_type=activation, verbose=verbose)
        proto = onnx.load(os.fspath(quantized_path))
        if count_ops(proto, "BatchNormalization"):
            raise ExportError(f"{count_ops(proto, 'BatchNormalization')} BatchNormalization node(s) in the "
                              "quantized graph; refusing to write an unfolded INT8 file")
        gate = accuracy_gate(fp32_onnx, quantized_path, split, config.max_accuracy_drop)
        if not gate.passed:
            raise _refusal(gate, config, calibration_source)
        fp32_size = Path(fp32_onnx).stat().st_size
        quantization = {
            "format": "QDQ", "weights": "int8", "per_channel": config.per_channel,
            "activation_type": activation, "reduce_range": reduce_range,
            "reduce_range_source": "CPU flags" if config.reduce_range is None else "given",
            "calibration": config.calibration, "calibration_samples": int(len(calibration)),
            "calibration_inputs": calibration_source,
            "percentile": PERCENTILE if config.calibration == "percentile" else None,
            "cpu": {"model": cpu_name(), **cpu.to_dict()},
            "accuracy": gate.to_dict(),
            "parity_vs_fp32": {"top1_agreement": gate.parity.top1_agreement,
                               "max_abs_error": gate.parity.max_abs_error,
                               "max_rel_error": gate.parity.max_rel_error,
                               "mask_agreement": gate.mask_agreement, "samples": gate.parity.samples},
            "quantized_layers": quantized.quantized_layers, "float_layers": quantized.float_layers,
            "fp32_size_bytes": fp32_size,
        }
        set_metadata(proto, {**spec_metadata(spec), "bnfold.folded": str(fold).lower(),
                             "bnfold.weights_dtype": "int8",
                             QUANT_METADATA_KEY: json.dumps({k: v for k, v in quantization.items()
                                                            if k not in ("accuracy", "parity_vs_fp32", "cpu")})})
        with staged_file(path) as tmp:
            onnx.save_model(proto, os.fspath(tmp))
            size = tmp.stat().st_size
        quantization["size_bytes"] = size
        quantization["size_ratio"] = round(fp32_size / size, 3)
    notes.insert(0, f"{gate.metric} on the {gate.samples} eval samples of {gate.dataset!r}: FP32 {gate.fp32:.4f}, "
                    f"INT8 {gate.int8:.4f} (drop {gate.drop_points:.2f} points, allowed {gate.max_drop_points:.1f}); "
                    f"{config.calibration} calibration on {calibration_source}; reduce_range={reduce_range}, "
                    f"{activation} activations ({cpu.note.split(':')[0]})")
    if quantized.float_layers:
        notes.append(f"{len(quantized.float_layers)} layer(s) stay float: {', '.join(quantized.float_layers)}")
    return ArtifactReport(format="int8", path=path, exporter="onnxruntime.quantization.quantize_static (QDQ)",
                          dtype="int8", dynamic_batch=True, folded=fold, parity=gate.parity,
                          # Not a tolerance on the outputs: INT8 is held to the accuracy gate instead.
                          tolerance=None, parity_inputs=f"the {gate.samples} eval samples of "
                          f"{gate.dataset!r}, against the FP32 ONNX file", size_bytes=size,
                          seconds=time.perf_counter() - start, input_name=INPUT_NAME,
                          output_name=output_name(spec), opset=model_opset(proto), fold_report=fold_report,
                          notes=notes, details={"int8": quantization})


def load_calibration_file(path: str | os.PathLike) -> np.ndarray:
    """Calibration inputs saved with `numpy.save` (N, C, H, W), already preprocessed."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"calibration data {str(path)!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ExportError(f"calibration data {str(path)!r} is not a .npy array file: {exc}") from None


def export_from_config(model: nn.Module, spec: ModelSpec, path: Path, config: "ExportConfig",
                       samples: torch.Tensor | None) -> ArtifactReport:
    """`export_int8` with the options of an `ExportConfig` (the "int8" entry in `export.WRITERS`).

    When the same run already wrote a dynamic-batch FP32 `model.onnx` beside `path`, that file is
    quantized instead of exporting the model a second time.
    """
    int8 = Int8Config(calibration=config.calibration, calibration_samples=config.calibration_samples,
                      max_accuracy_drop=config.max_accuracy_drop, per_channel=not config.per_tensor)
    int8.check()
    calibration = load_calibration_file(config.calibration_data) if config.calibration_data else None
    sibling = path.with_name("model.onnx")
    # The INT8 file keeps a dynamic batch axis (the gate runs batches); a static or float16
    # model.onnx cannot be its source.
    reuse = sibling if sibling.is_file() and config.fold and not config.fp16 and not config.static_batch else None
    return export_int8(model, spec, path, config=int8, data_root=config.data_root, calibration_data=calibration,
                       fp32_onnx=reuse, fold=config.fold, opset=config.opset, legacy=config.legacy_onnx,
                       verbose=config.verbose)


__all__ = ["AccuracyGateError", "CALIBRATIONS", "CpuInt8Support", "Gate", "INT8_FILE", "Int8Config",
           "Quantized", "accuracy_gate", "calibration_inputs", "cpu_int8_support", "export_from_config",
           "export_int8", "load_calibration_file", "quantize_onnx"]
