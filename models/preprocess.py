"""Replay a spec's eval-time `Preprocess` with PIL + numpy only (what a server does)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from bnfold.errors import BnfoldError
from bnfold.models.spec import Preprocess

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def resized_size(width: int, height: int, size: int | list[int]) -> tuple[int, int]:
    """(width, height) after `resize`: an int sets the shorter side keeping the aspect ratio, [h, w] is exact."""
    if isinstance(size, int):
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size
    return int(size[1]), int(size[0])


def resize(img: Image.Image, size: int | list[int], interpolation: str = "bilinear") -> Image.Image:
    """torchvision's Resize semantics: an int sets the shorter side keeping the aspect ratio."""
    try:
        method = _INTERPOLATION[interpolation]
    except KeyError:
        raise BnfoldError(f"unknown interpolation {interpolation!r}; choose one of {sorted(_INTERPOLATION)}") from None
    width, height = img.size
    new_w, new_h = resized_size(width, height, size)
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), method)


def center_crop(img: Image.Image, crop: list[int]) -> Image.Image:
    """torchvision's CenterCrop for a crop no larger than the image."""
    height, width = int(crop[0]), int(crop[1])
    img_w, img_h = img.size
    if height > img_h or width > img_w:
        raise BnfoldError(f"center crop {crop} is larger than the resized image {img_h}x{img_w}")
    top = int(round((img_h - height) / 2.0))
    left = int(round((img_w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def preprocess_image(img: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """One PIL image -> float32 array (C, H, W), normalized as the model was trained."""
    img = img.convert(preprocess.mode)
    img = resize(img, preprocess.resize, preprocess.interpolation)
    if preprocess.crop is not None:
        img = center_crop(img, preprocess.crop)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(preprocess.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(preprocess.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)
