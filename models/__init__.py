"""Architectures, datasets, augmentation, training and checkpoints.

    model = models.build("resnet20", num_classes=10)
    model, spec = models.create("lenet", "digits")           # untrained, sized for the data
    result = models.train(models.TrainConfig(model="lenet", out="runs/lenet"))
    model, spec = models.load_checkpoint(result.best)          # eval mode, spec filled
"""
from models.checkpoint import CheckpointError, is_checkpoint, load_checkpoint, save_checkpoint
from models.data import DatasetError, digit_image, load_datasets, sample_inputs
from models.factory import create
from models.preprocess import preprocess_image
from models.registry import UnknownModelError, build, list_models, register
from models.spec import SPEC_METADATA_KEY, ModelSpec, Preprocess
from models.train import TrainConfig, TrainingError, TrainResult, train, train_summary

__all__ = [
    "SPEC_METADATA_KEY", "CheckpointError", "DatasetError", "ModelSpec", "Preprocess", "TrainConfig",
    "TrainResult", "TrainingError", "UnknownModelError", "build", "create", "digit_image", "is_checkpoint", "list_models",
    "load_checkpoint", "load_datasets", "preprocess_image", "register", "sample_inputs", "save_checkpoint",
    "train", "train_summary",
]
