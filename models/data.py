"""Datasets by name and their augmentation presets.

`digits` is bundled (scikit-learn's 1,797 handwritten 8x8 scans) and needs no files; `mnist`,
`fashion-mnist` and `cifar10` come from torchvision under a data root (downloaded only when
asked); `imagefolder:PATH` reads the user's own images. Every dataset yields PIL images; the
eval transform is the spec's `Preprocess` replayed with PIL + numpy (`models.preprocess`), so
what the model saw at evaluation is exactly what a server will feed it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bnfold.errors import BnfoldError, first_line
from bnfold.models.preprocess import preprocess_image
from bnfold.models.spec import ModelSpec, Preprocess

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0          # fixed: the test split is the same on every machine
DIGITS_MASK_THRESHOLD = 128    # foreground = upscaled intensity >= half of full scale

MNIST_LABELS = [str(i) for i in range(10)]
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Published train-split statistics; the digits' and an image folder's are computed.
_TORCHVISION = {
    # name: (torchvision class, folder it expects under the root, labels, grey, mean, std, flip keeps label)
    "mnist": ("MNIST", "MNIST/raw", MNIST_LABELS, True, [0.1307], [0.3081], False),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", FASHION_LABELS, True, [0.2860], [0.3530], True),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", CIFAR10_LABELS, False,
                [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], True),
}
DATASETS = ["digits", *_TORCHVISION, "imagefolder:PATH"]


class DatasetError(BnfoldError):
    """An unknown dataset name or dataset files that are missing or unreadable."""


# ---------------------------------------------------------------------------------------------
# The bundled digits


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 8x8 scans as uint8 0..255 and labels, split once: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


@functools.lru_cache(maxsize=8)
def digits_arrays(split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits of `split` ("train"/"test") upscaled with PIL bilinear to size x size: (uint8 N,H,W, labels)."""
    x_train, y_train, x_test, y_test = _digits_raw()
    if split not in ("train", "test"):
        raise DatasetError(f"digits split must be 'train' or 'test', got {split!r}")
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    up = np.stack([np.asarray(Image.fromarray(im, "L").resize((size, size), Image.Resampling.BILINEAR))
                   for im in images])
    up.setflags(write=False)
    return up, labels


def digits_mask(images: np.ndarray) -> np.ndarray:
    """The foreground mask (uint8 0/1) of upscaled digit images."""
    return (images >= DIGITS_MASK_THRESHOLD).astype(np.uint8)


def digit_image(index: int, size: int | None = None) -> tuple[Image.Image, int]:
    """A test-split bundled digit as a grey PIL image (size x size, default 28) and its label."""
    images, labels = digits_arrays("test", size or 28)
    if not 0 <= index < len(images):
        raise DatasetError(f"digit index {index} is out of range: the test split has {len(images)} images")
    return Image.fromarray(images[index], "L"), int(labels[index])


class ArrayImages(Dataset):
    """uint8 images (N, H, W) as grey PIL images with targets, through a transform."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: Callable[..., Any], *,
                 masks: np.ndarray | None = None) -> None:
        self.images, self.targets, self.transform, self.masks = images, targets, transform, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.fromarray(self.images[index], "L")
        if self.masks is None:
            return self.transform(img), torch.tensor(self.targets[index])
        from torchvision import tv_tensors
        mask = tv_tensors.Mask(torch.from_numpy(self.masks[index][None].copy()))
        x, m = self.transform(img, mask)
        return x, m.as_subclass(torch.Tensor).float()


class Transformed(Dataset):
    """A dataset of (PIL image, label) through a transform of the image."""

    def __init__(self, base: Any, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = self.base[index]
        return self.transform(img), torch.tensor(label)


# ---------------------------------------------------------------------------------------------
# What a dataset looks like before any file is read


@dataclass
class DatasetInfo:
    name: str
    labels: list[str]
    grey: bool
    mean: list[float] | None      # None: computed from the files (image folders)
    std: list[float] | None
    flip: bool                    # horizontal flip keeps the label


def dataset_info(dataset: str, data_root: str | Path = "data") -> DatasetInfo:
    """Labels and statistics of a dataset; reads files only for an image folder."""
    if dataset == "digits":
        return DatasetInfo("digits", MNIST_LABELS, True, None, None, False)
    if dataset in _TORCHVISION:
        _, _, labels, grey, mean, std, flip = _TORCHVISION[dataset]
        return DatasetInfo(dataset, labels, grey, mean, std, flip)
    if dataset.startswith("imagefolder:"):
        train_dir, _ = _imagefolder_dirs(dataset)
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        return DatasetInfo(dataset, classes, False, None, None, True)
    raise DatasetError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")


def _imagefolder_dirs(dataset: str) -> tuple[Path, Path | None]:
    """PATH/train + PATH/val (or test) when present, else PATH itself (split 80/20 later)."""
    path = Path(dataset.split(":", 1)[1]).expanduser()
    if not path.is_dir():
        # A checkpoint keeps the path `bnfold train` was given: export/evaluate run from another
        # folder look for it there, so say where a relative path was looked for.
        where = "" if path.is_absolute() else f" (relative to the current folder, {str(Path.cwd())!r})"
        raise DatasetError(f"image folder {str(path)!r} does not exist{where}; expected PATH/<class name>/*.png|jpg "
                           f"(or PATH/train/<class>/ and PATH/val/<class>/)")
    train = path / "train"
    if train.is_dir():
        for name in ("val", "test"):
            if (path / name).is_dir():
                return train, path / name
        return train, None
    classes = [p for p in path.iterdir() if p.is_dir()]
    if len(classes) < 2:
        raise DatasetError(f"image folder {str(path)!r} needs at least two class sub-folders, found "
                           f"{[p.name for p in classes]}")
    return path, None


# ---------------------------------------------------------------------------------------------
# Augmentation presets


def train_transform(spec: ModelSpec) -> tuple[Callable[..., Any], list[str]]:
    """The training augmentation for a spec and its human-readable description.

    Geometric transforms are mild for digits (a digit cropped or turned far stops being one);
    horizontal flip only where it keeps the label (never digits: a flipped 2 is not a 2). For
    segmentation the same geometric transform is applied to image and mask (v2 + tv_tensors.Mask).
    """
    from torchvision.transforms import v2

    info = dataset_info(spec.dataset) if not spec.dataset.startswith("imagefolder:") else None
    flip = info.flip if info else True
    p = spec.preprocess
    size = tuple(spec.input_shape[1:])
    small = spec.dataset in ("digits", "mnist", "fashion-mnist")
    scale = (0.8, 1.0) if small else (0.5, 1.0)
    ratio = (0.9, 1.1) if small else (3 / 4, 4 / 3)
    degrees = 10
    jitter = dict(brightness=0.3, contrast=0.3) if small else dict(brightness=0.3, contrast=0.3, saturation=0.3)
    if spec.task == "segmentation":
        # The target mask is a threshold of the clean image's intensity: jittering the image alone
        # would move that threshold and teach the model fuzzy edges (test IoU stalled near 0.90).
        jitter = {}
    steps: list[Any] = [_Convert(p.mode), v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)]
    text = [f"Convert({p.mode!r})", f"RandomResizedCrop({list(size)}, scale={scale}, ratio={tuple(round(r, 3) for r in ratio)})"]
    if flip and spec.task == "classification":
        steps.append(v2.RandomHorizontalFlip())
        text.append("RandomHorizontalFlip(p=0.5)")
    steps.append(v2.RandomRotation(degrees))
    text.append(f"RandomRotation({degrees})")
    if jitter:
        steps.append(v2.ColorJitter(**jitter))
        text.append(f"ColorJitter({', '.join(f'{k}={v}' for k, v in jitter.items())})")
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(p.mean, p.std)]
    text += ["ToTensor()", f"Normalize(mean={p.mean}, std={p.std})"]
    return v2.Compose(steps), text


class _Convert:
    """PIL mode conversion that lets masks pass (a picklable class, for DataLoader workers)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, *inputs: Any) -> Any:
        out = tuple(x.convert(self.mode) if isinstance(x, Image.Image) else x for x in inputs)
        return out if len(out) > 1 else out[0]


class EvalTransform:
    """The spec's Preprocess replayed with PIL + numpy, as a tensor (picklable)."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, img: Image.Image, mask: Any = None) -> Any:
        x = torch.from_numpy(preprocess_image(img, self.preprocess))
        return x if mask is None else (x, mask)


# ---------------------------------------------------------------------------------------------
# Loading


def load_datasets(spec: ModelSpec, data_root: str | Path = "data", *, download: bool = False,
                  augment: bool = True) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets for a spec: train augmented (unless augment=False), eval preprocessed."""
    eval_tf = EvalTransform(spec.preprocess)
    train_tf = train_transform(spec)[0] if augment else eval_tf
    if spec.dataset == "digits":
        size = spec.input_shape[1]
        x_train, y_train = digits_arrays("train", size)
        x_test, y_test = digits_arrays("test", size)
        if spec.task == "segmentation":
            return (ArrayImages(x_train, y_train, train_tf, masks=digits_mask(x_train)),
                    ArrayImages(x_test, y_test, eval_tf, masks=digits_mask(x_test)))
        return ArrayImages(x_train, y_train, train_tf), ArrayImages(x_test, y_test, eval_tf)
    if spec.task == "segmentation":
        raise DatasetError(f"segmentation (unet) trains on the bundled digits only, not {spec.dataset!r}")
    train, test = _raw_datasets(spec.dataset, data_root, download)
    return Transformed(train, train_tf), Transformed(test, eval_tf)


def _raw_datasets(dataset: str, data_root: str | Path, download: bool) -> tuple[Any, Any]:
    if dataset in _TORCHVISION:
        return _torchvision_datasets(dataset, Path(data_root), download)
    if dataset.startswith("imagefolder:"):
        return _imagefolder_datasets(dataset)
    raise DatasetError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")


def _torchvision_datasets(dataset: str, root: Path, download: bool) -> tuple[Any, Any]:
    import torchvision.datasets as tvd

    cls_name, folder, *_ = _TORCHVISION[dataset]
    cls = getattr(tvd, cls_name)
    if not download and not (root / folder).is_dir():
        raise DatasetError(
            f"{dataset} is not in {str(root / folder)!r}: put the torchvision {cls_name} files there "
            f"(set --data-root to the folder holding {folder.split('/')[0]}/), or pass --download to let "
            f"torchvision fetch them")
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except RuntimeError as exc:  # present but incomplete or corrupt
        raise DatasetError(f"could not read {dataset} from {str(root / folder)!r}: {exc}; "
                           f"pass --download to fetch it again") from None


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class _ReadableImage:
    """`is_valid_file` for ImageFolder: an image extension and a file PIL can verify; records the others."""

    def __init__(self) -> None:
        self.unreadable: list[tuple[str, str]] = []

    def __call__(self, path: str) -> bool:
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            return False
        try:
            with Image.open(path) as image:
                image.verify()  # reads the whole file: catches truncated and non-image bytes
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            self.unreadable.append((path, first_line(exc, with_type=True, limit=160)))
            return False
        return True


def _image_folder(root: Path) -> Any:
    """torchvision's ImageFolder over `root`, skipping unreadable images with a warning that names them,
    and refusing class folders left without any image in one line."""
    import sys

    from torchvision.datasets import ImageFolder

    check = _ReadableImage()
    try:
        folder = ImageFolder(str(root), is_valid_file=check, allow_empty=True)
    except (FileNotFoundError, OSError) as exc:
        raise DatasetError(f"image folder {str(root)!r} cannot be read: {exc}") from None
    if check.unreadable:
        shown = "; ".join(f"{path} ({why})" for path, why in check.unreadable[:5])
        more = f" and {len(check.unreadable) - 5} more" if len(check.unreadable) > 5 else ""
        print(f"bnfold: warning: skipped {len(check.unreadable)} unreadable image(s) in {root}: {shown}{more}",
              file=sys.stderr, flush=True)
    counts = np.bincount(np.asarray(folder.targets, dtype=np.int64), minlength=len(folder.classes))
    empty = [name for name, n in zip(folder.classes, counts) if n == 0]
    if empty:
        raise DatasetError(f"image folder {str(root)!r}: class folder(s) {', '.join(empty)} hold no readable "
                           f"image ({', '.join(IMAGE_EXTENSIONS[:3])}, ...); add images or remove the folder(s)")
    return folder


@functools.lru_cache(maxsize=4)
def _imagefolder_datasets(dataset: str) -> tuple[Any, Any]:
    """(train, eval) of an image folder; cached, so that the statistics pass and training scan the files once."""
    from torch.utils.data import Subset

    train_dir, test_dir = _imagefolder_dirs(dataset)
    train = _image_folder(train_dir)
    if test_dir is not None:
        test = _image_folder(test_dir)
        if test.classes != train.classes:
            raise DatasetError(f"image folder {dataset!r}: {str(test_dir)!r} has classes {test.classes}, but "
                               f"{str(train_dir)!r} has {train.classes}; both need the same class folders")
        return train, test
    from sklearn.model_selection import train_test_split

    targets = np.asarray(train.targets)
    try:
        train_idx, test_idx = train_test_split(np.arange(len(targets)), test_size=0.2, stratify=targets,
                                               random_state=DIGITS_SPLIT_SEED)
    except ValueError:  # sklearn's words name classes by index: say it with the folder names
        counts = np.bincount(targets, minlength=len(train.classes))
        fewest = ", ".join(f"{train.classes[i]!r} ({counts[i]})" for i in np.argsort(counts, kind="stable")[:3])
        raise DatasetError(f"image folder {dataset!r} is too small to split 80/20 per class: {len(targets)} images "
                           f"in {len(train.classes)} class folders, the fewest in {fewest}; each class needs at "
                           f"least 2 images and a fifth of all images at least one per class, or give "
                           "PATH/train/<class>/ and PATH/val/<class>/ to split it yourself") from None
    return Subset(train, train_idx.tolist()), Subset(train, test_idx.tolist())


def imagefolder_stats(dataset: str, preprocess: Preprocess, limit: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of up to `limit` training images after the eval resize/crop."""
    train, _ = _imagefolder_datasets(dataset)
    plain = Preprocess(preprocess.mode, preprocess.resize, preprocess.crop, [0.0] * 3, [1.0] * 3,
                       preprocess.interpolation)
    count = min(limit, len(train))
    if count == 0:
        raise DatasetError(f"image folder {dataset!r} has no images")
    rng = np.random.default_rng(0)
    picks = rng.choice(len(train), size=count, replace=False)
    arrays = np.stack([preprocess_image(train[int(i)][0], plain) for i in picks])
    mean = arrays.mean(axis=(0, 2, 3))
    std = arrays.std(axis=(0, 2, 3))
    return [float(v) for v in mean], [float(max(v, 1e-3)) for v in std]


def sample_inputs(spec: ModelSpec, n: int = 32, data_root: str | Path = "data") -> torch.Tensor | None:
    """n preprocessed eval-split inputs (N, C, H, W float32), or None when the data is not available."""
    try:
        _, test = load_datasets(spec, data_root, download=False, augment=False)
    except DatasetError:
        return None
    count = min(n, len(test))
    return torch.stack([test[i][0] for i in range(count)]).float()
