"""The user's own inputs for INT8 calibration and gating: an image folder or a .npy / .npz file.

    data = load_user_data("calib/", spec, option="--calibration-data")
    data.inputs        # float32 (N, C, H, W), through the spec's eval preprocessing
    data.labels        # class indices into spec.labels, or None for unlabelled inputs

What a path may be:

| path | inputs | labels |
|---|---|---|
| a folder of images | every image, read with the spec's preprocessing (PIL, as `bnfold serve` does) | none |
| a folder of class folders (`PATH/<label>/*.png`) | every image in them | the folder name, found in the spec's labels (or a class index) |
| `x.npy` | the array, already preprocessed (N, C, H, W) | none |
| `x.npz` | `inputs` (or `x`, `images`, or its only array) | `labels` (or `y`, `targets`) when present |

Images are decoded by PIL and never resized silently beyond what the spec's preprocessing does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold.errors import first_line
from bnfold.models.data import IMAGE_EXTENSIONS
from bnfold.models.spec import ModelSpec

from .errors import ExportError

_INPUT_KEYS = ("inputs", "x", "images", "data")
_LABEL_KEYS = ("labels", "y", "targets")


@dataclass
class UserData:
    """Preprocessed inputs (N, C, H, W) float32, their labels (class indices) or None, and where
    they came from in words."""

    inputs: np.ndarray
    labels: np.ndarray | None
    source: str

    @property
    def samples(self) -> int:
        return int(self.inputs.shape[0])


def check_inputs(array: np.ndarray, spec: ModelSpec, what: str) -> np.ndarray:
    """`array` as float32 (N, *spec.input_shape), a lone sample given its batch axis."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ExportError(f"{what} holds {array.dtype} values; expected preprocessed float inputs "
                          f"[N, {', '.join(map(str, spec.input_shape))}] (or give a folder of images)")
    array = array.astype(np.float32, copy=False)
    expected = tuple(spec.input_shape)
    if array.ndim == len(expected):
        array = array[None]
    if array.ndim != len(expected) + 1 or tuple(array.shape[1:]) != expected or array.shape[0] == 0:
        raise ExportError(f"{what} has shape {list(array.shape)}, expected [N, {', '.join(map(str, expected))}] "
                          "with N >= 1 (the model's input shape)")
    if not np.isfinite(array).all():
        raise ExportError(f"{what} holds NaN or infinite values")
    return np.ascontiguousarray(array)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path, spec: ModelSpec) -> np.ndarray:
    from PIL import Image

    from bnfold.models.preprocess import preprocess_image

    try:
        with Image.open(path) as image:
            return preprocess_image(image, spec.preprocess)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for files that are not images
        raise ExportError(f"cannot read the image {str(path)!r} ({first_line(exc, with_type=True, limit=160)})") from None


def _label_index(name: str, spec: ModelSpec) -> int | None:
    if name in spec.labels:
        return spec.labels.index(name)
    if name.isdigit() and int(name) < len(spec.labels):
        return int(name)
    return None


def _from_folder(folder: Path, spec: ModelSpec, option: str) -> UserData:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and _images(p))
    loose = _images(folder)
    if classes and loose:
        raise ExportError(f"{option} {str(folder)!r} holds both images and class folders; give either images "
                          "(unlabelled) or PATH/<label>/ folders of images (labelled)")
    if not classes and not loose:
        raise ExportError(f"{option} {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) "
                          "and no class folders of images")
    if loose:
        inputs = np.stack([_read_image(p, spec) for p in loose])
        return UserData(check_inputs(inputs, spec, f"{option} {str(folder)!r}"), None,
                        f"{len(loose)} images of {str(folder)!r}")
    unknown = [p.name for p in classes if _label_index(p.name, spec) is None]
    if unknown:
        shown = ", ".join(spec.labels[:10]) + (", ..." if len(spec.labels) > 10 else "")
        raise ExportError(f"{option} {str(folder)!r}: class folder(s) {', '.join(unknown)} are not among the "
                          f"model's labels ({shown}); name each folder after a label (or its index), or pass "
                          "--labels when exporting")
    inputs, labels = [], []
    for cls in classes:
        for path in _images(cls):
            inputs.append(_read_image(path, spec))
            labels.append(_label_index(cls.name, spec))
    return UserData(check_inputs(np.stack(inputs), spec, f"{option} {str(folder)!r}"),
                    np.asarray(labels, dtype=np.int64),
                    f"{len(inputs)} labelled images in {len(classes)} class folders of {str(folder)!r}")


def _from_file(path: Path, spec: ModelSpec, option: str) -> UserData:
    what = f"{option} {str(path)!r}"
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ExportError(f"{what} is not a .npy or .npz array file ({first_line(exc, limit=160)}); give a "
                          "folder of images or numpy.save'd inputs") from None
    if isinstance(loaded, np.ndarray):
        inputs = check_inputs(loaded, spec, what)
        return UserData(inputs, None, f"{inputs.shape[0]} inputs of {str(path)!r}")
    with loaded:
        keys = list(loaded.files)
        key = next((k for k in _INPUT_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ExportError(f"{what} holds arrays {', '.join(keys)}; name the inputs one of "
                              f"{', '.join(_INPUT_KEYS)} (and the labels one of {', '.join(_LABEL_KEYS)})")
        inputs = check_inputs(loaded[key], spec, f"{what}[{key!r}]")
        label_key = next((k for k in _LABEL_KEYS if k in keys), None)
        labels = None
        if label_key is not None:
            labels = np.asarray(loaded[label_key])
            if labels.shape != (inputs.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
                raise ExportError(f"{what}[{label_key!r}] has shape {list(labels.shape)} of {labels.dtype}; expected "
                                  f"[{inputs.shape[0]}] integer class indices, one per input")
            if labels.min() < 0 or labels.max() >= len(spec.labels):
                raise ExportError(f"{what}[{label_key!r}] holds class indices outside 0..{len(spec.labels) - 1} "
                                  "(the model's labels)")
            labels = labels.astype(np.int64)
    described = f"{inputs.shape[0]} {'labelled ' if labels is not None else ''}inputs of {str(path)!r}"
    return UserData(inputs, labels, described)


def load_user_data(path: str | os.PathLike, spec: ModelSpec, *, option: str = "--calibration-data") -> UserData:
    """Inputs (and labels, when the data has them) from an image folder or a .npy / .npz file;
    `option` names the option in error messages."""
    path = Path(path)
    if path.is_dir():
        return _from_folder(path, spec, option)
    if not path.is_file():
        raise ExportError(f"{option} {str(path)!r} does not exist")
    return _from_file(path, spec, option)


__all__ = ["UserData", "check_inputs", "load_user_data"]
