"""A spec for any image classifier: labels, mean/std, input size and colour mode from the user.

A bnfold checkpoint carries its own `ModelSpec`. A model from elsewhere (an ONNX file, a
state_dict, a torchvision architecture) does not, so `bnfold export`, `bnfold fold-onnx` and
`bnfold serve --spec` build one from options (`--labels`, `--mean`, `--std`, `--input-size`,
`--grayscale`). No torch here: `serve` reads spec files with it and never imports torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.models.spec import ModelSpec, Preprocess

# torchvision's and timm's ImageNet weights expect these; a user's own model states its own.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class SpecError(BnfoldError):
    """A spec option or spec file that cannot describe the model."""


@dataclass
class SpecOptions:
    """What the user said about preprocessing and labels; None means "not given"."""

    labels: list[str] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    input_size: tuple[int, int] | None = None   # (height, width)
    grayscale: bool = False

    def given(self) -> bool:
        return any(v is not None for v in (self.labels, self.mean, self.std, self.input_size)) or self.grayscale


def parse_labels(text: str) -> list[str]:
    """`--labels`: a file (one label per line, or a JSON list) when one exists at `text`, else a,b,c."""
    path = Path(text).expanduser()
    if path.is_file():
        raw = path.read_text(encoding="utf-8")
        if raw.lstrip().startswith("["):
            try:
                labels = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise SpecError(f"labels file {text!r} starts like JSON but is not: {exc}") from None
            if not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels):
                raise SpecError(f"labels file {text!r} must hold a JSON list of strings")
            labels = [str(x) for x in labels]
        else:
            labels = [line.strip() for line in raw.splitlines() if line.strip()]
    elif path.is_dir():
        raise SpecError(f"--labels {text!r} is a folder; give a text file with one label per line, or a,b,c")
    else:
        labels = [part.strip() for part in text.split(",") if part.strip()]
    if not labels:
        raise SpecError(f"--labels {text!r} names no labels")
    return labels


def parse_floats(text: str, what: str) -> list[float]:
    """`--mean 0.5` or `--mean 0.485,0.456,0.406`."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecError(f"{what} expects comma-separated numbers like 0.5 or 0.485,0.456,0.406, got {text!r}") from None
    if not values:
        raise SpecError(f"{what} names no numbers")
    return values


def parse_input_size(text: str) -> tuple[int, int]:
    """`--input-size 224` (square) or `--input-size 224,160` (height, width)."""
    try:
        dims = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise SpecError(f"--input-size expects a size like 224 or 224,160 (height,width), got {text!r}") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) <= 0:
        raise SpecError(f"--input-size expects one or two positive integers (height,width), got {text!r}")
    return dims[0], dims[1]


def _per_channel(values: list[float] | None, channels: int, default: float, what: str) -> list[float]:
    if values is None:
        return [default] * channels
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise SpecError(f"{what} has {len(values)} values but the model takes {channels} channel(s)")
    return list(values)


def build_spec(name: str, input_shape: tuple[int, ...] | list[int], options: SpecOptions, *,
               num_classes: int | None = None, default_mean: list[float] | None = None,
               default_std: list[float] | None = None, dataset: str = "", task: str = "classification",
               arch_kwargs: dict[str, Any] | None = None) -> ModelSpec:
    """A spec for a model that came without one.

    `input_shape` is one sample's (C, H, W) or a batch's (N, C, H, W); `--input-size` replaces
    H and W. Without `--labels` the classes are named "0".."N-1" (`num_classes` from the model's
    output). Without `--mean/--std` the image is only scaled to [0, 1] (mean 0, std 1), unless
    the source has a known convention (`default_mean`, `default_std`: ImageNet for torchvision).
    """
    shape = [int(d) for d in input_shape]
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise SpecError(f"an image spec needs an input of shape (channels, height, width) with the batch "
                        f"first, e.g. 1,3,224,224; this model's input is {list(input_shape)}")
    channels, height, width = shape
    if options.input_size is not None:
        height, width = options.input_size
    if channels not in (1, 3):
        raise SpecError(f"the image endpoint feeds 1 (grey) or 3 (RGB) channels; this model takes {channels}")
    if options.grayscale and channels != 1:
        raise SpecError(f"--grayscale: the model takes {channels} channels, not 1")
    mean = _per_channel(options.mean if options.mean is not None else default_mean, channels, 0.0, "--mean")
    std = _per_channel(options.std if options.std is not None else default_std, channels, 1.0, "--std")
    if any(s <= 0 for s in std):
        raise SpecError(f"--std values must be positive, got {std}")
    labels = options.labels
    if labels is None:
        labels = [str(i) for i in range(num_classes)] if num_classes else []
    elif num_classes is not None and len(labels) != num_classes:
        raise SpecError(f"--labels names {len(labels)} classes but the model outputs {num_classes} scores")
    preprocess = Preprocess(mode="L" if channels == 1 else "RGB", resize=[height, width], crop=None,
                            mean=mean, std=std)
    return ModelSpec(arch=name, arch_kwargs=dict(arch_kwargs or {}), task=task,
                     input_shape=[channels, height, width], preprocess=preprocess, labels=labels,
                     dataset=dataset)


def apply_options(spec: ModelSpec, options: SpecOptions) -> ModelSpec:
    """`spec` with the user's options laid over it (a checkpoint's spec corrected, or a file's)."""
    if not options.given():
        return spec
    channels = spec.input_shape[0]
    if options.grayscale and channels != 1:
        raise SpecError(f"--grayscale: the model takes {channels} channels, not 1")
    pre = spec.preprocess
    mean = _per_channel(options.mean, channels, 0.0, "--mean") if options.mean is not None else pre.mean
    std = _per_channel(options.std, channels, 1.0, "--std") if options.std is not None else pre.std
    if any(s <= 0 for s in std):
        raise SpecError(f"--std values must be positive, got {std}")
    shape = list(spec.input_shape)
    resize, crop = pre.resize, pre.crop
    if options.input_size is not None:
        shape[1:] = list(options.input_size)
        resize, crop = list(options.input_size), None
    labels = options.labels if options.labels is not None else spec.labels
    if options.labels is not None and spec.labels and len(options.labels) != len(spec.labels):
        raise SpecError(f"--labels names {len(options.labels)} classes but the model has {len(spec.labels)}")
    return replace(spec, input_shape=shape, labels=list(labels),
                   preprocess=replace(pre, mean=list(mean), std=list(std), resize=resize, crop=crop))


def read_spec_file(path: str | os.PathLike) -> ModelSpec:
    """`bnfold serve --spec FILE`: a whole spec (as in export.json's "spec"), or just the parts
    a user knows: {"labels": [...], "mean": [...], "std": [...], "input_shape": [C, H, W]}."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"--spec {str(path)!r} is a folder; give a JSON file")
    if not path.is_file():
        raise SpecError(f"--spec file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"--spec {str(path)!r} is not JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("spec"), dict):
        data = data["spec"]  # an export.json
    if not isinstance(data, dict):
        raise SpecError(f"--spec {str(path)!r} must hold a JSON object")
    if "preprocess" in data:
        try:
            return ModelSpec.from_dict(data)
        except (TypeError, KeyError) as exc:
            raise SpecError(f"--spec {str(path)!r} is not a valid bnfold spec: {exc}") from None
    known = {"labels", "mean", "std", "input_shape", "name", "task"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"--spec {str(path)!r}: unknown keys {unknown}; use {sorted(known)} "
                        "(or a whole spec as `bnfold export` writes into export.json)")
    if "input_shape" not in data:
        raise SpecError(f"--spec {str(path)!r} needs \"input_shape\": [channels, height, width]")
    labels = data.get("labels")
    options = SpecOptions(labels=[str(x) for x in labels] if labels is not None else None,
                          mean=data.get("mean"), std=data.get("std"))
    try:
        return build_spec(str(data.get("name", path.stem)), data["input_shape"], options,
                          task=str(data.get("task", "classification")))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"--spec {str(path)!r}: {exc}") from None


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SpecError", "SpecOptions", "apply_options", "build_spec",
           "parse_floats", "parse_input_size", "parse_labels", "read_spec_file"]
