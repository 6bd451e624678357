"""Architectures, datasets, augmentation, training and checkpoints.

    model = models.build("resnet20", num_classes=10)
    model, spec = models.create("lenet", "digits")           # untrained, sized for the data
    result = models.train(models.TrainConfig(model="lenet", out="runs/lenet"))
    model, spec = models.load_checkpoint(result.best)          # eval mode, spec filled

The public names are imported on first use: the HTTP service needs only the spec and the image
preprocessing, and should not pay seconds of start-up for importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.checkpoint import CheckpointError, is_checkpoint, load_checkpoint, save_checkpoint
    from models.data import DatasetError, digit_image, load_datasets, sample_inputs
    from models.factory import create
    from models.preprocess import preprocess_image
    from models.registry import UnknownModelError, build, list_models, register
    from models.spec import SPEC_METADATA_KEY, ModelSpec, Preprocess
    from models.training import TrainConfig, TrainingError, TrainResult, train, train_summary

_LAZY = {
    "CheckpointError": "models.checkpoint", "is_checkpoint": "models.checkpoint",
    "load_checkpoint": "models.checkpoint", "save_checkpoint": "models.checkpoint",
    "DatasetError": "models.data", "digit_image": "models.data", "load_datasets": "models.data",
    "sample_inputs": "models.data",
    "create": "models.factory",
    "preprocess_image": "models.preprocess",
    "UnknownModelError": "models.registry", "build": "models.registry", "list_models": "models.registry",
    "register": "models.registry",
    "SPEC_METADATA_KEY": "models.spec", "ModelSpec": "models.spec", "Preprocess": "models.spec",
    "TrainConfig": "models.training", "TrainingError": "models.training", "TrainResult": "models.training",
    "train": "models.training", "train_summary": "models.training",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
