"""The configs of `bnfold export` and `bnfold evaluate`, their defaults and their checks (no torch here).

`ExportConfig` nests `Int8Config` (the int8 format's calibration and accuracy gate), the way the
command's --help groups those options. `export_model(config)` reads all of it; each writer in
`export.writers.WRITERS` reads the fields that concern its format (`opset` and `legacy_onnx` only
the ONNX ones, `int8` only the INT8 one). The CLI builds both configs with `bnfold.options.from_args`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from bnfold.models.spec import MAX_BATCH_SIZE
from bnfold.models.spec_options import SpecOptions

from .errors import ExportError

# The largest batch Triton may form from queued requests when the model's batch axis is dynamic
# (`max_batch_size` in config.pbtxt): the one constant `bnfold serve` also enforces and reports,
# kept in the spec module both packages read (serve must not import export, which imports torch).
TRITON_MAX_BATCH_SIZE = MAX_BATCH_SIZE

# What `--format` defaults to for a PyTorch model (an ONNX file only stays ONNX).
DEFAULT_FORMATS: tuple[str, ...] = ("onnx", "torchscript", "program")
CALIBRATIONS: tuple[str, ...] = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES: tuple[str, ...] = ("uint8", "int8")
TRITON_DEVICES: tuple[str, ...] = ("cpu", "cuda")


@dataclass
class Int8Config:
    """How to quantize (`--format int8`) and how much accuracy may be lost."""

    calibration: str = "minmax"                      # minmax, percentile or entropy
    calibration_samples: int = 256                   # drawn from the training split
    # A folder of images (read with the spec's preprocessing) or a .npy/.npz of inputs, calibrated on
    # instead of the training split (export.user_data).
    calibration_data: str | os.PathLike | None = None
    # What the gate measures on instead of the dataset's eval split: class folders of images (the
    # accuracy gate), or unlabelled images / .npy / .npz (the agreement gate). No dataset and none of
    # these: a quarter of the calibration inputs is held out for the agreement gate.
    eval_data: str | os.PathLike | None = None
    max_accuracy_drop: float = 1.0                   # points on the eval split; more and nothing is written
    min_agreement: float = 0.98                      # agreement gate: INT8 top-1 equal to FP32's on this fraction
    max_output_error: float = 0.1                    # agreement gate: ||INT8 - FP32|| / ||FP32|| (SQNR 20 dB)
    per_channel: bool = True                         # False (--per-tensor): one scale per weight tensor
    reduce_range: bool | None = None                 # None: from the CPU's flags
    activation_type: str | None = None               # "uint8" or "int8"; None: from the CPU
    seed: int = 0                                    # which training samples calibrate

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ExportError(f"unknown calibration method {self.calibration!r}; choose from: "
                              f"{', '.join(CALIBRATIONS)}")
        if self.calibration_samples < 1:
            raise ExportError(f"calibration samples must be at least 1, got {self.calibration_samples}")
        if not self.max_accuracy_drop >= 0:
            raise ExportError(f"max accuracy drop must be 0 or more points, got {self.max_accuracy_drop}")
        if not 0 <= self.min_agreement <= 1:
            raise ExportError(f"--min-agreement is a fraction from 0 to 1, got {self.min_agreement}")
        if not self.max_output_error >= 0:
            raise ExportError(f"--max-output-error must be 0 or more, got {self.max_output_error}")
        if self.activation_type is not None and self.activation_type not in ACTIVATION_TYPES:
            raise ExportError(f"unknown activation type {self.activation_type!r}; choose from: "
                              f"{', '.join(ACTIVATION_TYPES)}")


@dataclass
class ExportConfig:
    """One export run: the source model, where the files go, and how they are written."""

    source: str | os.PathLike            # a checkpoint, state_dict, pickled module, ONNX file, timm:NAME, ...
    out: str | os.PathLike
    formats: list[str] | tuple[str, ...] | str | None = None   # None: DEFAULT_FORMATS, or onnx for an ONNX file
    fold: bool = True                    # False: export without folding BatchNorm first
    opset: int | None = None             # ONNX opset; None: the exporter's own default
    legacy_onnx: bool = False            # the TorchScript-based ONNX exporter instead of dynamo
    dynamic_batch: bool = True           # False (--static-batch): the batch axis fixed at 1
    fp16: bool = False                   # float16 weights in every file: what the fp16 format's writer sets
                                         # (model.fp16.onnx); the CLI asks for FP16 only as --format fp16
    rtol: float | None = None            # parity tolerance; None: 1e-5, or 1e-2 with float16 weights
    triton_repo: str | os.PathLike | None = None   # also add the ONNX file to this Triton repository
    triton_device: str = "cpu"           # instance_group kind in config.pbtxt
    triton_name: str | None = None       # None: the architecture's name
    data_root: str = "data"              # where the model's dataset lives (parity samples)
    force: bool = False                  # replace an existing output folder / Triton model
    progress: bool = True
    verbose: bool = False                # show the exporters' own output and warnings
    # A model from elsewhere (see models.loader): how to build and read it, and its spec options.
    model_class: str | None = None       # FILE.py:Class, package.module:Class, torchvision:NAME, timm:NAME
    model_args: str | dict | list | None = None   # JSON keyword (object) or positional (list) arguments
    weights: str | os.PathLike | None = None      # a state_dict for a torchvision:NAME / timm:NAME model
    trust_pickle: bool = False           # allow unpickling a whole torch.save'd module (runs its code)
    input_shape: tuple[int, ...] | None = None    # batch first; where the file does not say it
    spec_options: SpecOptions | None = None       # --labels, --mean, --std, --input-size, --grayscale
    batchnorm: list[str] | None = None   # --batchnorm CLASS=ADAPTER declarations (models.loader.load_batchnorms)
    int8: Int8Config = field(default_factory=Int8Config)   # the int8 format: calibration and accuracy gate

    def __post_init__(self) -> None:
        if self.formats is not None:   # normalized here, once: aliases (pt2, ts), case, duplicates
            from .writers import check_formats

            self.formats = check_formats(self.formats)
        if self.triton_device not in TRITON_DEVICES:
            raise ExportError(f"--triton-device must be one of {', '.join(TRITON_DEVICES)}, got {self.triton_device!r}")
        if self.rtol is not None and not self.rtol > 0:
            raise ExportError(f"--rtol must be positive, got {self.rtol}")
        if self.opset is not None and self.opset < 1:
            raise ExportError(f"--opset must be positive, got {self.opset}")


@dataclass
class EvaluateConfig:
    """One `bnfold evaluate` run: the artifacts, where their spec and data come from, how to run them."""

    artifacts: list[str | os.PathLike] = field(default_factory=list)
    checkpoint: str | os.PathLike | None = None   # the checkpoint whose spec holds for every artifact
    dataset: str | None = None           # None: the spec's dataset
    data_root: str = "data"
    batch_size: int = 64                 # inputs per run (the figure does not depend on it)
    threads: int = 0                     # torch / onnxruntime threads; 0: the CPUs this process may use
    json: bool = False                   # print JSON instead of a table
    model_class: str | None = None
    model_args: str | dict | list | None = None
    weights: str | os.PathLike | None = None
    trust_pickle: bool = False
    # Instead of the dataset: class folders of images (accuracy), or unlabelled images / .npy / .npz
    # (each artifact's agreement with the first one); export.user_data reads them.
    eval_data: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if not self.artifacts:
            raise ExportError("evaluate needs at least one artifact")
        if self.batch_size < 1:
            raise ExportError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.threads is None or self.threads < 0:
            raise ExportError(f"--threads must be 0 (the CPUs this process may use) or more, got {self.threads}")



__all__ = ["ACTIVATION_TYPES", "CALIBRATIONS", "DEFAULT_FORMATS", "EvaluateConfig", "ExportConfig", "Int8Config",
           "TRITON_DEVICES", "TRITON_MAX_BATCH_SIZE"]
