"""The model spec: everything needed to rebuild, preprocess and label a trained model.

It travels inside every checkpoint (`models.checkpoint`) and, as JSON under the key
`SPEC_METADATA_KEY`, inside every exported ONNX file's `metadata_props`, so that a server can
preprocess an image and name the classes without the checkpoint or bnfold's training code.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.versions import __version__

SPEC_METADATA_KEY = "bnfold.spec"
SPEC_VERSION = 1
# The largest batch one request may carry when a model's batch axis is dynamic: Triton's
# `max_batch_size` that export.triton writes into config.pbtxt, and what `bnfold serve` enforces
# for a model file without one (one constant for both, here in the contract they share).
MAX_BATCH_SIZE = 32
# A served model's name (a URL segment and a Triton repository folder): export.triton and
# serve.repository both hold names to it.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


Tensor = tuple[str, str, Sequence[int]]   # (name, v2 datatype such as "FP32", shape with the batch axis, -1 free)


def triton_model_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor], *,
                        max_batch_size: int, device: str = "cpu") -> dict[str, Any]:
    """Triton's ModelConfig of an ONNX model, as the dict `GET /v2/models/{m}/config` answers.

    `export.triton` writes the same fields as config.pbtxt (with its own additions: label file,
    dynamic batching, version policy). With `max_batch_size` > 0 the batch axis is the model's,
    so Triton leaves it out of `dims`; 0 means a fixed batch axis and full shapes.
    """
    batching = max_batch_size > 0

    def tensors(items: Sequence[Tensor]) -> list[dict[str, Any]]:
        return [{"name": tensor_name, "data_type": "TYPE_" + datatype,
                 "dims": list(shape[1:] if batching else shape)} for tensor_name, datatype, shape in items]

    return {"name": name, "platform": "onnxruntime_onnx", "max_batch_size": max_batch_size,
            "input": tensors(inputs), "output": tensors(outputs),
            "instance_group": [{"count": 1, "kind": "KIND_GPU" if device == "cuda" else "KIND_CPU"}]}


class SpecVersionError(BnfoldError):
    """A spec written by a newer bnfold (a higher `spec_version`) than this one can read."""


def check_spec_version(version: Any) -> None:
    """Refuse a spec newer than `SPEC_VERSION`: its fields may mean things this bnfold does not know."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SpecVersionError(f"spec_version {version!r} is not a positive integer")
    if version > SPEC_VERSION:
        raise SpecVersionError(f"the model spec has spec_version {version}, newer than the {SPEC_VERSION} this "
                               f"bnfold ({__version__}) reads: upgrade bnfold (pip install -U bnfold)")


@dataclass
class Preprocess:
    """The eval-time transform, written so that PIL + numpy can replay it without torchvision.

    Applied in this order: convert to `mode` ("L" grey or "RGB"), resize (an int resizes the
    shorter side keeping the aspect ratio; [h, w] resizes exactly), center-crop to `crop`
    ([h, w], or None for no crop), scale to [0, 1], then (x - mean) / std per channel.
    """

    mode: str
    resize: int | list[int]
    crop: list[int] | None
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"


@dataclass
class ModelSpec:
    """What a served or exported model needs besides its weights: input shape, preprocessing, labels.

    `bnfold train` writes one into every checkpoint and the loader makes one for a model you bring
    (`--input-shape`, `--labels`, `--mean`, `--std`). From Python, the exporters take your module
    and one of these; it goes into the ONNX file's metadata, so that `bnfold serve` can turn an
    uploaded image into the input tensor and name the classes:

        import torch
        from bnfold.export import export_onnx
        from bnfold.models.spec import ModelSpec, Preprocess

        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        spec = ModelSpec(
            arch="catdog",                  # the name it is served under (`bnfold serve` URL)
            arch_kwargs={},                 # constructor arguments, for models.build (registry models only)
            task="classification",
            input_shape=[3, 64, 64],        # one sample, batch excluded
            preprocess=Preprocess(mode="RGB", resize=72, crop=[64, 64],   # shorter side to 72, center 64x64
                                  mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            labels=["cat", "dog"],          # one per output score
            dataset="my photos")            # for the record
        export_onnx(net.eval(), spec, "catdog.onnx")   # folded, checked against `net`, then written

    Then `bnfold serve catdog.onnx` answers `curl -T cat.jpg http://127.0.0.1:8000/predictions/catdog`.
    The remaining fields are filled in by training (epoch, metrics, train_transform) and export
    (versions); `spec_version` lets a newer bnfold refuse a spec it cannot read.
    """

    arch: str                                   # registry name for models.build
    arch_kwargs: dict[str, Any]                 # constructor arguments for models.build
    task: str                                   # "classification" or "segmentation"
    input_shape: list[int]                      # [C, H, W] of one sample, batch excluded
    preprocess: Preprocess
    labels: list[str]                           # class names; segmentation: ["background", "foreground"]
    dataset: str
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    train_transform: list[str] = field(default_factory=list)  # human-readable, for the record
    versions: dict[str, str] = field(default_factory=dict)
    spec_version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        check_spec_version(data.get("spec_version", SPEC_VERSION))
        data["preprocess"] = Preprocess(**data["preprocess"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls.from_dict(json.loads(text))
