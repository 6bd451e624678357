"""`ExportConfig`: everything `bnfold export` takes, as one typed value (the way `TrainConfig` works).

`export_checkpoint(config)` reads all of it; each writer in `export.writers.WRITERS` reads the
fields that concern its format (`opset` and `legacy_onnx` only the ONNX one, for example).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from bnfold.models.spec import MAX_BATCH_SIZE
from bnfold.models.spec_options import SpecOptions

# The largest batch Triton may form from queued requests when the model's batch axis is dynamic
# (`max_batch_size` in config.pbtxt): the one constant `bnfold serve` also enforces and reports,
# kept in the spec module both packages read (serve must not import export, which imports torch).
TRITON_MAX_BATCH_SIZE = MAX_BATCH_SIZE

DEFAULT_FORMATS: tuple[str, ...] = ("onnx", "torchscript", "program")


@dataclass
class ExportConfig:
    """One export run: the checkpoint, where the files go, and how they are written."""

    checkpoint: str | os.PathLike
    out: str | os.PathLike
    formats: list[str] | tuple[str, ...] | str = field(default_factory=lambda: list(DEFAULT_FORMATS))
    fold: bool = True                    # False: export without folding BatchNorm first
    opset: int | None = None             # ONNX opset; None: the exporter's own default
    legacy_onnx: bool = False            # the TorchScript-based ONNX exporter instead of dynamo
    static_batch: bool = False           # batch axis fixed at 1 instead of dynamic
    fp16: bool = False                   # float16 weights behind float32 inputs and outputs
    triton_repo: str | os.PathLike | None = None   # also add the ONNX file to this Triton repository
    triton_device: str = "cpu"           # instance_group kind in config.pbtxt
    triton_name: str | None = None       # None: the architecture's name
    data_root: str = "data"              # where the checkpoint's dataset lives (parity samples)
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
    # The int8 format (export.int8): calibration and the accuracy gate.
    calibration: str = "minmax"          # minmax, percentile or entropy
    calibration_samples: int = 256       # drawn from the training split
    calibration_data: str | os.PathLike | None = None   # a .npy (N, C, H, W) used instead of them
    max_accuracy_drop: float = 1.0       # points on the eval split; more and nothing is written
    per_tensor: bool = False             # one weight scale per tensor instead of per channel

    @property
    def dynamic_batch(self) -> bool:
        return not self.static_batch


__all__ = ["ExportConfig", "DEFAULT_FORMATS", "TRITON_MAX_BATCH_SIZE"]
