"""`build_for_dataset`: an untrained model sized for a dataset, with its filled spec (`build` makes the bare module)."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.models.data import dataset_info, digits_arrays, imagefolder_stats, train_transform
from bnfold.models.registry import build, get_builder
from bnfold.models.spec import ModelSpec, Preprocess

_IMAGENET_RESNETS = ("resnet18", "resnet34", "resnet50")
SEGMENTATION_ARCHS = ("unet",)


def versions() -> dict[str, str]:
    """Library versions recorded in every spec."""
    import torch
    import torchvision

    from bnfold.versions import package_version

    out = {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}
    bnfold_version = package_version("bnfold")
    if bnfold_version is not None:  # a plain checkout that was never installed has none
        out["bnfold"] = bnfold_version
    return out


def default_input_size(arch: str, dataset: str) -> int:
    """28 for LeNet on grey 28x28 data, 32 otherwise (ResNets and unet on digits, CIFAR)."""
    if arch == "lenet" and dataset in ("digits", "mnist", "fashion-mnist"):
        return 28
    return 32


def build_for_dataset(arch: str, dataset: str = "digits", *, input_size: int | None = None, data_root: str = "data",
           **arch_kwargs: Any) -> tuple[nn.Module, ModelSpec]:
    """An untrained `arch` sized for `dataset` and its spec (epoch 0).

    Digits: LeNet 1x28x28 grey, ResNets 3x32x32, unet 1x32x32 with a 1-channel mask output.
    `input_size` overrides the resolution (e.g. resnet50 at 224); ImageNet-style ResNets get
    `small_input=True` at 64 pixels or less. Reads no files except for `imagefolder:PATH`.
    """
    get_builder(arch)  # unknown name -> error listing the choices, before anything else
    info = dataset_info(dataset, data_root)
    task = "segmentation" if arch in SEGMENTATION_ARCHS else "classification"
    if task == "segmentation" and dataset != "digits":
        raise BnfoldError(f"{arch} (segmentation) trains on the bundled digits only, not {dataset!r}")
    size = int(input_size or default_input_size(arch, dataset))
    if size <= 0:
        raise BnfoldError(f"input_size must be positive, got {input_size!r}")
    if task == "segmentation" and size % 4:
        raise BnfoldError(f"{arch} pools twice and upsamples back: input_size must be a multiple of 4, got {size}")
    # LeNet keeps grey input on grey data; ResNets take RGB everywhere (grey replicated), unet grey.
    grey = task == "segmentation" or (arch == "lenet" and info.grey)
    mode, channels = ("L", 1) if grey else ("RGB", 3)
    preprocess = _eval_transform(info.name, mode, size)
    preprocess.mean, preprocess.std = _statistics(dataset, info, preprocess, channels, size)

    kwargs: dict[str, Any] = {"num_classes": 1 if task == "segmentation" else len(info.labels),
                              "in_channels": channels}
    if arch == "lenet":
        kwargs["input_size"] = size
    if arch in _IMAGENET_RESNETS:
        kwargs["small_input"] = size <= 64
    kwargs.update({k: v for k, v in arch_kwargs.items() if v is not None})
    model = build(arch, **kwargs)
    labels = ["background", "foreground"] if task == "segmentation" else list(info.labels)
    spec = ModelSpec(arch=arch, arch_kwargs=kwargs, task=task, input_shape=[channels, size, size],
                     preprocess=preprocess, labels=labels, dataset=dataset, epoch=0, versions=versions())
    spec.train_transform = train_transform(spec)[1]
    return model, spec


def _eval_transform(name: str, mode: str, size: int) -> Preprocess:
    """The spec's eval-time resize and crop (mean and std are filled in by `_statistics`)."""
    if name.startswith("imagefolder:"):
        # The classic eval: shorter side to size/0.875, then the central size x size.
        return Preprocess(mode=mode, resize=int(round(size / 0.875)), crop=[size, size], mean=[], std=[])
    return Preprocess(mode=mode, resize=[size, size], crop=None, mean=[], std=[])


def _statistics(dataset: str, info: Any, preprocess: Preprocess, channels: int,
                size: int) -> tuple[list[float], list[float]]:
    if dataset == "digits":
        # From the train split at the model's resolution: grey replicated into RGB has one value.
        images, _ = digits_arrays("train", size)
        arr = images.astype(np.float64) / 255.0
        return [round(float(arr.mean()), 6)] * channels, [round(float(arr.std()), 6)] * channels
    if info.mean is not None:
        mean, std = list(info.mean), list(info.std)
        if len(mean) == 1 and channels == 3:
            return mean * 3, std * 3
        if len(mean) == 3 and channels == 1:  # grey from RGB: ITU-R 601 luma weights, as PIL's "L"
            weights = [0.299, 0.587, 0.114]
            return [sum(w * m for w, m in zip(weights, mean))], [sum(w * s for w, s in zip(weights, std))]
        return mean, std
    mean, std = imagefolder_stats(dataset, preprocess)
    if channels == 1:
        return [float(np.mean(mean))], [float(np.mean(std))]
    return mean, std
