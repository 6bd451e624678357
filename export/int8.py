"""INT8 writer: fold, export FP32 ONNX, calibrate, quantize, gate on accuracy or on agreement with FP32.

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

A model that brings its own data (any model: a state_dict + class, a pickled module, ONNX) calibrates
on `Int8Config.calibration_data` (a folder of images read with the spec's preprocessing, or a
.npy / .npz of inputs; `export.user_data`) and is gated on `Int8Config.eval_data`: labelled images
give the accuracy gate above; unlabelled inputs, or none at all (then a quarter of the calibration
inputs is held out), give the agreement gate: INT8's top-1 agreement with FP32 must be at least
`min_agreement` and its output error (||INT8 - FP32|| / ||FP32||) at most `max_output_error`.
The advice of a refusal fits the data: it never asks for more samples than exist, and says when
one eval sample is worth more than the allowed drop (the gate cannot measure it).

`reduce_range` (7-bit weights) is chosen from the CPU's flags as onnxruntime's guidance says:
on x86 without VNNI the uint8 x int8 products saturate 16-bit intermediates, so weights lose a
bit; with VNNI (or AMX), or on ARM, they keep all 8. Without VNNI the report notes that INT8
may not be faster than FP32 there.
"""
from __future__ import annotations

import json
import math
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
from bnfold.onnx_fold import graph_inputs
from bnfold.models.loader import load_batchnorms
from bnfold.models.spec import ModelSpec
from bnfold.models.metrics import task_metric
from bnfold.versions import cpu_name

from bnfold.errors import first_line
from bnfold.export._common import quiet, staged_file
from bnfold.export.config import ACTIVATION_TYPES, CALIBRATIONS, Int8Config
from bnfold.export.errors import ExportError
from bnfold.export.evaluate import (EvalSplit, load_eval_split, onnx_session, output_error, score,
                                    session_runner)
from bnfold.export.onnx import (INPUT_NAME, count_ops, export_onnx, model_opset, set_metadata,
                                spec_metadata)
from bnfold.export.summary import ArtifactReport
from bnfold.export.user_data import UserData, check_inputs, load_user_data

if TYPE_CHECKING:
    from bnfold.export.config import ExportConfig

INT8_FILE = "model.int8.onnx"
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


class Int8GateError(ExportError):
    """The INT8 model failed its gate against FP32; no INT8 file was written. `gate` holds the figures."""

    def __init__(self, message: str, gate: "Gate | AgreementGate") -> None:
        super().__init__(message)
        self.gate = gate


class AccuracyGateError(Int8GateError):
    """The INT8 model lost more accuracy against FP32 than allowed; no INT8 file was written."""

    def __init__(self, message: str, gate: "Gate") -> None:
        super().__init__(message, gate)
        self.fp32, self.int8, self.drop_points = gate.fp32, gate.int8, gate.drop_points


class AgreementGateError(Int8GateError):
    """The INT8 model agreed too little with FP32 on unlabelled inputs; no INT8 file was written."""


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


# ---------------------------------------------------------------------------------------------
# Calibration data


@dataclass
class Calibration:
    """The calibration inputs, where they came from, and how many more that source holds (for advice)."""

    inputs: np.ndarray
    source: str
    available: int               # inputs the source holds (the training split's size, the file's count)
    from_split: bool             # drawn from the training split (--calibration-samples picks how many)


def _training_calibration(spec: ModelSpec, samples: int, data_root: str | os.PathLike, seed: int) -> Calibration:
    from bnfold import models

    try:
        train, _ = models.load_datasets(spec, str(data_root), download=False, augment=False)
    except models.DatasetError as exc:
        raise ExportError(f"INT8 calibration needs the training split of {spec.dataset!r} ({exc}); or pass "
                          "--calibration-data PATH (a folder of images or a .npy/.npz of inputs)") from None
    count = min(samples, len(train))
    if count == 0:
        raise ExportError(f"the training split of {spec.dataset!r} is empty: nothing to calibrate on")
    picks = np.random.default_rng(seed).choice(len(train), size=count, replace=False)
    inputs = np.stack([np.asarray(train[int(i)][0], dtype=np.float32) for i in sorted(picks)])
    return Calibration(inputs, f"{count} training-split samples of {spec.dataset!r} (seed {seed})", len(train), True)


def calibration_inputs(spec: ModelSpec, samples: int, data_root: str | os.PathLike = "data",
                       seed: int = 0) -> tuple[np.ndarray, str]:
    """`samples` training-split images (fewer if the split is smaller) through the spec's eval
    preprocessing, drawn at random with `seed`, and where they came from."""
    found = _training_calibration(spec, samples, data_root, seed)
    return found.inputs, found.source


def check_calibration_data(spec: ModelSpec, data: np.ndarray | torch.Tensor) -> np.ndarray:
    """Given calibration inputs as float32 (N, C, H, W) of the spec's shape."""
    array = np.asarray(data.detach().cpu() if isinstance(data, torch.Tensor) else data)
    return check_inputs(array, spec, "calibration data")


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an in-memory array, in small batches."""

    def __init__(self, inputs: np.ndarray, batch: int = CALIBRATION_BATCH, name: str = INPUT_NAME) -> None:
        self._batches = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
        self._next = 0
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return {self._name: self._batches[self._next - 1]}


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


def _even_batch(count: int, largest: int = CALIBRATION_BATCH) -> int:
    """The largest batch size up to `largest` that splits `count` inputs into equal batches."""
    return next(b for b in range(min(largest, count), 0, -1) if count % b == 0)


def _input_name(path: str | os.PathLike) -> str:
    """The one fed input of an ONNX file (bnfold's are called "input"; a file from elsewhere names its own)."""
    return graph_inputs(onnx.load(os.fspath(path), load_external_data=False))[0].name


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
    # The histogram calibrators (percentile, entropy) stack the batches they collected and fail on
    # a last batch of another size ("inhomogeneous shape"): all batches of one size for them.
    batch = CALIBRATION_BATCH if method == "minmax" else _even_batch(len(calibration))
    with quiet(not verbose):
        try:
            # ONNX shape inference is enough for a CNN; onnxruntime's symbolic one is meant for
            # transformers, and when it gives up it dumps sym_shape_infer_temp.onnx into the cwd.
            quant_pre_process(os.fspath(fp32_path), os.fspath(pre), skip_symbolic_shape=True)
        except Exception as exc:  # its shape inference or optimizer may refuse a graph: go without
            shutil.copyfile(fp32_path, pre)
            if verbose:
                print(f"quant_pre_process skipped: {first_line(exc, with_type=True, deepest=True)}")
        try:
            quantize_static(
                os.fspath(pre), os.fspath(out_path), _Reader(calibration, batch, name=_input_name(fp32_path)),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=methods[method], extra_options=extra)
        except Exception as exc:  # calibrators and quantizers raise many types
            raise ExportError(f"onnxruntime quantize_static ({method} calibration) failed: {first_line(exc, with_type=True, deepest=True)}; "
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

    def summary(self) -> str:
        return (f"{self.metric} on the {self.samples} eval samples of {self.dataset!r}: FP32 {self.fp32:.4f}, "
                f"INT8 {self.int8:.4f} (drop {self.drop_points:.2f} points, allowed {self.max_drop_points:.1f})")

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


@dataclass
class AgreementGate:
    """FP32 against INT8 on unlabelled inputs: top-1 agreement and output error."""

    agreement: float               # fraction of inputs whose INT8 argmax is FP32's (per position beyond 2-D)
    output_error: float            # ||INT8 - FP32|| / ||FP32|| over all of them (output_error())
    min_agreement: float
    max_output_error: float
    samples: int
    source: str                    # the inputs, in words
    parity: "bnfold.Parity"

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and self.output_error <= self.max_output_error

    def to_dict(self) -> dict[str, Any]:
        return {"metric": "agreement", "top1_agreement": self.agreement, "min_agreement": self.min_agreement,
                "output_error": self.output_error, "max_output_error": self.max_output_error,
                "samples": self.samples, "inputs": self.source, "passed": self.passed}

    def summary(self) -> str:
        return (f"agreement with FP32 on {self.source}: top-1 {self.agreement:.4f} (at least {self.min_agreement:.4f}), "
                f"output error {self.output_error:.4f} (||INT8 - FP32|| / ||FP32||, at most {self.max_output_error:.4f})")


def agreement_gate(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, inputs: np.ndarray, source: str,
                   config: Int8Config) -> AgreementGate:
    """Run both files on `inputs` (never calibrated on) and compare their outputs."""
    fp32 = _Recorder(session_runner(onnx_session(fp32_path)))
    int8 = _Recorder(session_runner(onnx_session(int8_path)))
    batches = [inputs[i:i + 64] for i in range(0, len(inputs), 64)]
    parity = bnfold.compare(fp32, int8, batches)
    agreement = parity.top1_agreement if parity.top1_agreement is not None else 1.0
    return AgreementGate(agreement, output_error(fp32.all(), int8.all()), config.min_agreement,
                         config.max_output_error, len(inputs), source, parity)


def _calibration_tips(config: Int8Config, calibration: Calibration) -> list[str]:
    """What to try on the calibration side, never asking for more samples than the source holds."""
    tips = []
    used = len(calibration.inputs)
    if calibration.from_split and used < calibration.available:
        more = min(calibration.available, max(4 * used, 512))
        tips.append(f"more calibration samples (--calibration-samples {more}; the training split holds "
                    f"{calibration.available})")
    elif calibration.from_split:
        tips.append(f"calibration inputs of your own (--calibration-data PATH: all {calibration.available} "
                    "training-split samples were used)")
    else:
        tips.append(f"more or more typical calibration inputs in --calibration-data (it gave {used})")
    others = [m for m in CALIBRATIONS if m != config.calibration]
    tips.append(f"another calibration method (--calibration {' or '.join(others)})")
    tips.append("per-tensor weights (--per-tensor)" if config.per_channel else "per-channel weights (drop --per-tensor)")
    return tips


def resolution_warning(samples: int, max_drop_points: float) -> str | None:
    """When one eval sample is worth more than the allowed drop, the gate cannot measure that drop: say
    so and what to pass instead; None when it can."""
    step = 100.0 / samples
    if step <= max_drop_points:
        return None
    needed = math.ceil(100.0 / max_drop_points) if max_drop_points > 0 else None
    wanted = (f"--eval-data with at least {needed} labelled images" if needed is not None
              else "--eval-data with more labelled images")
    return (f"with {samples} eval samples one sample is {step:.1f} points, more than the allowed "
            f"{max_drop_points:.1f}, so this gate cannot measure a drop that small: pass {wanted}, or unlabelled "
            f"inputs for the agreement gate (--eval-data PATH of images or .npy, --min-agreement), or allow "
            f"--max-accuracy-drop {step:.1f}")


def _refusal(gate: Gate, config: Int8Config, calibration: Calibration) -> AccuracyGateError:
    tips = _calibration_tips(config, calibration)
    tips.append(f"or allow a larger drop (--max-accuracy-drop, now {config.max_accuracy_drop:.1f} points)")
    blind = resolution_warning(gate.samples, gate.max_drop_points)
    return AccuracyGateError(
        f"INT8 {gate.metric} {gate.int8:.4f} is {gate.drop_points:.2f} points below FP32 {gate.fp32:.4f} on "
        f"the {gate.samples} eval samples of {gate.dataset!r} (allowed: {gate.max_drop_points:.1f}); "
        f"calibrated on {calibration.source} with {config.calibration}; no INT8 file was written. "
        + (f"Note: {blind}. " if blind else "") + f"Try {', '.join(tips)}", gate)


def _agreement_refusal(gate: AgreementGate, config: Int8Config, calibration: Calibration) -> AgreementGateError:
    tips = _calibration_tips(config, calibration)
    tips.append(f"or loosen the gate (--min-agreement, now {config.min_agreement:.2f}; --max-output-error, now "
                f"{config.max_output_error:.2f})")
    return AgreementGateError(
        f"INT8 {gate.summary()}: refused; calibrated on {calibration.source} with {config.calibration}; no INT8 "
        f"file was written. Try {', '.join(tips)}", gate)


# ---------------------------------------------------------------------------------------------
# The writer


# A quarter of the calibration inputs is held out for the agreement gate when nothing else gates.
HOLDOUT_FRACTION = 0.25


def _calibration(spec: ModelSpec, config: Int8Config, data_root: str | os.PathLike,
                 given: np.ndarray | torch.Tensor | UserData | None) -> Calibration:
    """The calibration inputs: given ones, `config.calibration_data`, or the training split."""
    if isinstance(given, UserData):
        return Calibration(check_inputs(given.inputs, spec, "calibration data"), given.source, given.samples, False)
    if given is not None:
        inputs = check_calibration_data(spec, given)
        return Calibration(inputs, f"{len(inputs)} given samples", len(inputs), False)
    if config.calibration_data is not None:
        data = load_user_data(config.calibration_data, spec, option="--calibration-data")
        return Calibration(data.inputs, data.source, data.samples, False)
    if not spec.dataset:
        # A model from elsewhere: bnfold knows no data of its own to calibrate on.
        raise ExportError("INT8 needs calibration inputs and this model's spec names no bnfold dataset: pass "
                          "--calibration-data PATH (a folder of images, read with the model's preprocessing, or a "
                          ".npy/.npz of preprocessed inputs) and, to gate on accuracy, --eval-data PATH (a folder "
                          "of class folders of images); without --eval-data the gate is INT8's agreement with FP32 "
                          "on held-out calibration inputs")
    return _training_calibration(spec, config.calibration_samples, data_root, config.seed)


def _hold_out(calibration: Calibration, seed: int) -> tuple[Calibration, np.ndarray, str]:
    """Split off HOLDOUT_FRACTION of the calibration inputs (at least one) for the agreement gate."""
    n = len(calibration.inputs)
    if n < 2:
        raise ExportError(f"the agreement gate holds out some calibration inputs, and {calibration.source} gave "
                          f"{n}: pass at least 2 (better dozens), or --eval-data PATH to gate on")
    held = max(1, round(n * HOLDOUT_FRACTION))
    order = np.random.default_rng(seed).permutation(n)
    kept, out = np.sort(order[held:]), np.sort(order[:held])
    rest = Calibration(calibration.inputs[kept], f"{n - held} of {calibration.source} (the other {held} held out "
                       "for the gate)", calibration.available - held, calibration.from_split)
    return rest, calibration.inputs[out], f"{held} held-out inputs of {calibration.source}"


def export_int8(model: nn.Module | None, spec: ModelSpec, path: str | os.PathLike, *,
                config: Int8Config | None = None, data_root: str | os.PathLike = "data",
                calibration_data: np.ndarray | torch.Tensor | UserData | None = None,
                eval_split: EvalSplit | None = None, fp32_onnx: str | os.PathLike | None = None,
                fold: bool = True, opset: int | None = None, legacy_onnx: bool = False,
                verbose: bool = False, batchnorms: Any = None) -> ArtifactReport:
    """Write `model` as a gated INT8 (QDQ) ONNX file at `path`.

    Calibration inputs are `calibration_data` (an array of the spec's shape), else
    `config.calibration_data` (a folder of images or a .npy/.npz), else the training split of the
    spec's dataset. The gate is the accuracy drop on `eval_split`, else on `config.eval_data` when it
    is labelled, else on the spec's eval split; with unlabelled `config.eval_data`, or with no
    dataset at all (then a quarter of the calibration inputs is held out), it is INT8's agreement
    with FP32. `fp32_onnx` (the folded FP32 export of the same model) skips exporting again; with
    it `model` may be None. Raises `AccuracyGateError` or `AgreementGateError` (and writes nothing)
    when the gate fails.
    """
    config = config or Int8Config()   # checked when it was made
    if model is None and fp32_onnx is None:
        raise ExportError("export_int8 needs a model or the FP32 ONNX file to quantize")
    start = time.perf_counter()
    path = Path(path)
    cpu = cpu_int8_support()
    reduce_range = cpu.reduce_range if config.reduce_range is None else config.reduce_range
    activation = config.activation_type or cpu.activation_type
    calibration = _calibration(spec, config, data_root, calibration_data)
    notes = [cpu.note] if not cpu.vnni and cpu.machine in ("x86_64", "amd64") else []

    split: EvalSplit | None = eval_split
    unlabelled: tuple[np.ndarray, str] | None = None
    if split is None and config.eval_data is not None:
        data = load_user_data(config.eval_data, spec, option="--eval-data")
        if data.labels is not None:
            split = EvalSplit(data.inputs, data.labels, str(config.eval_data), "classification")
        else:
            unlabelled = (data.inputs, data.source)
    elif split is None and spec.dataset:
        try:
            split = load_eval_split(spec, data_root)
        except ExportError as exc:
            if calibration.from_split:
                raise
            notes.append(f"gated on agreement with FP32: {exc}")
    if split is None and unlabelled is None:
        calibration, held, source = _hold_out(calibration, config.seed)
        unlabelled = (held, source)
    parity_samples = split.inputs[:32] if split is not None else unlabelled[0][:32]  # type: ignore[index]

    # The work folder is the system's temporary one: a refused export leaves nothing beside `path`.
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-") as work:
        work = Path(work)
        if fp32_onnx is None:
            # Parity inputs: real inputs of the model, as export_checkpoint uses.
            fp32_report = export_onnx(model, spec, work / "model.onnx", fold=fold, opset=opset, legacy_onnx=legacy_onnx,
                                      samples=torch.from_numpy(np.ascontiguousarray(parity_samples)),
                                      verbose=verbose, batchnorms=batchnorms)
            fp32_onnx, fold_report = fp32_report.path, fp32_report.fold_report
        else:
            fold_report = None
        quantized_path = work / INT8_FILE
        quantized = quantize_onnx(fp32_onnx, quantized_path, calibration.inputs, method=config.calibration,
                                  per_channel=config.per_channel, reduce_range=reduce_range,
                                  activation_type=activation, verbose=verbose)
        proto = onnx.load(os.fspath(quantized_path))
        if count_ops(proto, "BatchNormalization"):
            raise ExportError(f"{count_ops(proto, 'BatchNormalization')} BatchNormalization node(s) in the "
                              "quantized graph; refusing to write an unfolded INT8 file")
        gate: Gate | AgreementGate
        if split is not None:
            gate = accuracy_gate(fp32_onnx, quantized_path, split, config.max_accuracy_drop)
            if not gate.passed:
                raise _refusal(gate, config, calibration)
            blind = resolution_warning(gate.samples, gate.max_drop_points)
            if blind:
                notes.append(f"warning: {blind}")
        else:
            gate = agreement_gate(fp32_onnx, quantized_path, unlabelled[0], unlabelled[1], config)  # type: ignore[index]
            if not gate.passed:
                raise _agreement_refusal(gate, config, calibration)
        fp32_size = Path(fp32_onnx).stat().st_size
        quantization = {
            "format": "QDQ", "weights": "int8", "per_channel": config.per_channel,
            "activation_type": activation, "reduce_range": reduce_range,
            "reduce_range_source": "CPU flags" if config.reduce_range is None else "given",
            "calibration": config.calibration, "calibration_samples": int(len(calibration.inputs)),
            "calibration_inputs": calibration.source,
            "percentile": PERCENTILE if config.calibration == "percentile" else None,
            "cpu": {"model": cpu_name(), **cpu.to_dict()},
            "gate": "accuracy" if isinstance(gate, Gate) else "agreement",
            ("accuracy" if isinstance(gate, Gate) else "agreement"): gate.to_dict(),
            "parity_vs_fp32": {"top1_agreement": gate.parity.top1_agreement,
                               "max_abs_error": gate.parity.max_abs_error,
                               "max_rel_error": gate.parity.max_rel_error,
                               "mask_agreement": getattr(gate, "mask_agreement", None),
                               "samples": gate.parity.samples},
            "quantized_layers": quantized.quantized_layers, "float_layers": quantized.float_layers,
            "fp32_size_bytes": fp32_size,
        }
        set_metadata(proto, {**spec_metadata(spec), "bnfold.folded": str(fold).lower(),
                             "bnfold.weights_dtype": "int8",
                             QUANT_METADATA_KEY: json.dumps({k: v for k, v in quantization.items() if k not in
                                                            ("accuracy", "agreement", "parity_vs_fp32", "cpu")})})
        with staged_file(path) as tmp:
            onnx.save_model(proto, os.fspath(tmp))
            size = tmp.stat().st_size
        quantization["size_bytes"] = size
        quantization["size_ratio"] = round(fp32_size / size, 3)
    notes.insert(0, f"{gate.summary()}; {config.calibration} calibration on {calibration.source}; "
                    f"reduce_range={reduce_range}, {activation} activations ({cpu.note.split(':')[0]})")
    if quantized.float_layers:
        notes.append(f"{len(quantized.float_layers)} layer(s) stay float: {', '.join(quantized.float_layers)}")
    against = (f"the {gate.samples} eval samples of {gate.dataset!r}" if isinstance(gate, Gate)
               else f"{gate.source}")
    return ArtifactReport(format="int8", path=path, exporter="onnxruntime.quantization.quantize_static (QDQ)",
                          dtype="int8", dynamic_batch=True, folded=fold, parity=gate.parity,
                          # Not a tolerance on the outputs: INT8 is held to its gate instead.
                          tolerance=None, parity_inputs=f"{against}, against the FP32 ONNX file", size_bytes=size,
                          seconds=time.perf_counter() - start, input_name=graph_inputs(proto)[0].name,
                          output_name=proto.graph.output[0].name, opset=model_opset(proto), fold_report=fold_report,
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
    int8 = config.int8
    sibling = path.with_name("model.onnx")
    # The INT8 file keeps a dynamic batch axis (the gate runs batches); a static or float16
    # model.onnx cannot be its source.
    reuse = sibling if sibling.is_file() and config.fold and not config.fp16 and config.dynamic_batch else None
    return export_int8(model, spec, path, config=int8, data_root=config.data_root, fp32_onnx=reuse, fold=config.fold, opset=config.opset, legacy_onnx=config.legacy_onnx,
                       verbose=config.verbose, batchnorms=load_batchnorms(config.batchnorm))


__all__ = ["AccuracyGateError", "AgreementGate", "AgreementGateError", "CALIBRATIONS", "Calibration", "CpuInt8Support",
           "Gate", "INT8_FILE", "Int8Config", "Int8GateError", "Quantized", "accuracy_gate", "agreement_gate",
           "calibration_inputs", "cpu_int8_support", "export_from_config", "export_int8", "load_calibration_file",
           "output_error", "quantize_onnx", "resolution_warning"]
