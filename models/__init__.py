"""Architectures, datasets, augmentation, training and checkpoints.

    model = models.build("resnet20", num_classes=10)
    model, spec = models.build_for_dataset("lenet", "digits")  # untrained, sized for the data, + spec
    result = models.train(models.TrainConfig(model="lenet", out="runs/lenet"))
    model, spec = models.load_checkpoint(result.best)          # eval mode, spec filled

The public names are imported on first use: the HTTP service needs only the spec and the image
preprocessing, and should not pay seconds of start-up for importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bnfold.lazy import lazy_attributes

if TYPE_CHECKING:
    from bnfold.models.checkpoint import CheckpointError, is_checkpoint, load_checkpoint, save_checkpoint
    from bnfold.models.data import DatasetError, digit_image, load_datasets, sample_inputs
    from bnfold.models.factory import build_for_dataset
    from bnfold.models.preprocess import preprocess_image
    from bnfold.models.registry import UnknownModelError, build, list_models, register
    from bnfold.models.spec import SPEC_METADATA_KEY, ModelSpec, Preprocess
    from bnfold.models.training import TrainConfig, TrainingError, TrainResult, train, train_summary

_LAZY = {
    "CheckpointError": "bnfold.models.checkpoint", "is_checkpoint": "bnfold.models.checkpoint",
    "load_checkpoint": "bnfold.models.checkpoint", "save_checkpoint": "bnfold.models.checkpoint",
    "DatasetError": "bnfold.models.data", "digit_image": "bnfold.models.data", "load_datasets": "bnfold.models.data",
    "sample_inputs": "bnfold.models.data",
    "build_for_dataset": "bnfold.models.factory",
    "preprocess_image": "bnfold.models.preprocess",
    "UnknownModelError": "bnfold.models.registry", "build": "bnfold.models.registry", "list_models": "bnfold.models.registry",
    "register": "bnfold.models.registry",
    "SPEC_METADATA_KEY": "bnfold.models.spec", "ModelSpec": "bnfold.models.spec", "Preprocess": "bnfold.models.spec",
    "TrainConfig": "bnfold.models.train_config", "TrainingError": "bnfold.models.train_config", "TrainResult": "bnfold.models.training",
    "train": "bnfold.models.training", "train_summary": "bnfold.models.training",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
