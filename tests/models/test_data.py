"""Datasets and augmentation: the bundled digits, torchvision's missing-folder error, image folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnfold import models
from bnfold.errors import BnfoldError
from bnfold.models.data import EvalTransform, digits_arrays, digits_mask, load_datasets, train_transform
from bnfold.models.preprocess import preprocess_image


def test_digits_split_is_fixed_and_stratified():
    x_train, y_train = digits_arrays("train", 28)
    x_test, y_test = digits_arrays("test", 28)
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 360
    assert x_train.shape[1:] == (28, 28) and x_train.dtype == np.uint8
    counts = np.bincount(y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 of each digit
    again = digits_arrays.__wrapped__("test", 28)[0]  # recomputed from scratch: same split
    assert np.array_equal(again, x_test)


def test_digit_image_is_a_grey_test_digit_at_the_asked_size():
    img, label = models.digit_image(0)
    assert img.mode == "L" and img.size == (28, 28) and 0 <= label <= 9
    assert np.array_equal(np.asarray(img), digits_arrays("test", 28)[0][0])
    big, same_label = models.digit_image(0, size=32)
    assert big.size == (32, 32) and same_label == label
    with pytest.raises(BnfoldError, match="360"):
        models.digit_image(360)


def test_digits_loaders_for_each_architecture():
    for arch, shape in (("lenet", (1, 28, 28)), ("resnet20", (3, 32, 32))):
        _, spec = models.build_for_dataset(arch, "digits")
        train, test = load_datasets(spec)
        assert len(train) == 1437 and len(test) == 360
        x, y = test[5]
        assert tuple(x.shape) == shape and x.dtype == torch.float32 and y.dtype == torch.int64
        xt, _ = train[5]
        assert tuple(xt.shape) == shape
    # Normalization with the train split's statistics: train inputs come out near zero mean, unit std.
    _, spec = models.build_for_dataset("lenet")
    train, _ = load_datasets(spec, augment=False)
    batch = torch.stack([train[i][0] for i in range(0, 1437, 7)])
    assert abs(float(batch.mean())) < 0.1 and abs(float(batch.std()) - 1) < 0.1


def test_unet_digits_masks_follow_the_image_through_augmentation():
    _, spec = models.build_for_dataset("unet", "digits")
    train, test = load_datasets(spec)
    x, mask = test[3]
    assert x.shape == (1, 32, 32) and mask.shape == (1, 32, 32)
    raw = digits_arrays("test", 32)[0][3]
    assert torch.equal(mask[0], torch.from_numpy(digits_mask(raw)).float())
    torch.manual_seed(0)
    for i in range(8):
        xa, ma = train[i]
        assert set(torch.unique(ma).tolist()) <= {0.0, 1.0}
        bright = xa[0] > xa[0].mean() + 0.5 * xa[0].std()
        fg = ma[0] > 0.5
        iou = (bright & fg).sum() / (bright | fg).sum()
        assert iou > 0.6, f"sample {i}: mask and image disagree after the joint transform (IoU {iou:.2f})"


def test_train_transform_presets():
    _, spec = models.build_for_dataset("lenet", "digits")
    text = " ".join(spec.train_transform)
    for step in ("RandomResizedCrop", "RandomRotation", "ColorJitter", "ToTensor", "Normalize"):
        assert step in text
    assert "Flip" not in text  # a flipped 2 is not a 2
    _, cifar = models.build_for_dataset("resnet20", "cifar10")
    assert "RandomHorizontalFlip" in " ".join(cifar.train_transform)
    assert cifar.labels[0] == "airplane" and cifar.preprocess.mean[0] == pytest.approx(0.4914)
    tf, _ = train_transform(spec)
    img = models.digit_image(1)[0]
    out = tf(img)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32


def test_eval_preprocess_replays_with_pil_and_numpy():
    """The spec alone reproduces the eval inputs: what a server computes is what the model saw."""
    _, spec = models.build_for_dataset("resnet20", "digits")
    _, test = load_datasets(spec)
    img, _ = models.digit_image(9, size=32)
    expected = test[9][0].numpy()
    assert np.allclose(preprocess_image(img, spec.preprocess), expected, atol=1e-6)
    samples = models.sample_inputs(spec, n=4)
    assert samples.shape == (4, 3, 32, 32) and np.allclose(samples[3].numpy(), test[3][0].numpy())


def test_preprocess_resize_and_center_crop_match_torchvision():
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8), "RGB")
    spec_pre = models.Preprocess(mode="RGB", resize=37, crop=[32, 32], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    tv = v2.Compose([v2.Resize(37), v2.CenterCrop(32), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(spec_pre.mean, spec_pre.std)])
    assert np.allclose(preprocess_image(img, spec_pre), tv(img).numpy(), atol=1e-5)
    assert np.allclose(EvalTransform(spec_pre)(img).numpy(), tv(img).numpy(), atol=1e-5)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"),
                                         ("cifar10", "cifar-10-batches-py")])
def test_torchvision_dataset_missing_folder_says_where_and_download(tmp_path, name, folder):
    arch = "resnet20" if name == "cifar10" else "lenet"
    _, spec = models.build_for_dataset(arch, name)  # labels and statistics need no files
    with pytest.raises(models.DatasetError) as info:
        load_datasets(spec, tmp_path / "nowhere")
    message = str(info.value)
    assert folder in message and "nowhere" in message and "--download" in message
    assert models.sample_inputs(spec, data_root=str(tmp_path / "nowhere")) is None


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(BnfoldError) as info:
        models.build_for_dataset("lenet", "svhn")
    assert "svhn" in str(info.value) and "digits" in str(info.value) and "imagefolder:PATH" in str(info.value)


def _image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 6) -> Path:
    rng = np.random.default_rng(1)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 80, (40, 50, 3), dtype=np.uint8) + np.uint8(120 * k)
            Image.fromarray(arr, "RGB").save(root / name / f"{i}.png")
    return root


def test_imagefolder_classes_split_and_statistics(tmp_path):
    root = _image_folder(tmp_path / "pets")
    model, spec = models.build_for_dataset("resnet20", f"imagefolder:{root}")
    assert spec.labels == ["cat", "dog"] and spec.arch_kwargs["num_classes"] == 2
    assert spec.preprocess.crop == [32, 32] and spec.input_shape == [3, 32, 32]
    assert 0.2 < spec.preprocess.mean[0] < 0.8  # computed from the images, not a default
    train, test = load_datasets(spec)
    assert len(train) + len(test) == 12 and len(test) == 3  # a fixed 80/20 split (sklearn rounds the test part up)
    assert {int(train[i][1]) for i in range(len(train))} == {0, 1}
    x, y = train[0]
    assert x.shape == (3, 32, 32) and int(y) in (0, 1)
    assert models.sample_inputs(spec, n=3).shape == (3, 3, 32, 32)


def test_imagefolder_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(models.DatasetError, match="does not exist"):
        models.build_for_dataset("resnet20", f"imagefolder:{tmp_path / 'absent'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(models.DatasetError, match="two class"):
        models.build_for_dataset("resnet20", f"imagefolder:{tmp_path / 'one'}")


def test_imagefolder_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """A checkpoint keeps train's relative imagefolder:PATH; export/evaluate from another folder miss it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.DatasetError) as info:
        models.build_for_dataset("resnet20", "imagefolder:pictures")
    assert f"image folder 'pictures' does not exist (relative to the current folder, {str(tmp_path)!r})" \
        in str(info.value)


def test_unet_refuses_other_datasets_and_odd_sizes():
    with pytest.raises(BnfoldError, match="digits"):
        models.build_for_dataset("unet", "cifar10")
    with pytest.raises(BnfoldError, match="multiple of 4"):
        models.build_for_dataset("unet", input_size=30)


def _write_idx(root: Path, folder: str, n_train: int = 20, n_test: int = 10) -> None:
    """A tiny dataset in MNIST's own idx format, read by torchvision's real loader."""
    import struct

    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_loaders_read_files_under_the_data_root(tmp_path, name, folder):
    _write_idx(tmp_path, folder)
    for arch, shape in (("lenet", (1, 28, 28)), ("resnet20", (3, 32, 32))):
        _, spec = models.build_for_dataset(arch, name)
        train, test = load_datasets(spec, tmp_path)
        assert (len(train), len(test)) == (20, 10)
        x, y = train[3]
        assert tuple(x.shape) == shape and int(y) == 3
        samples = models.sample_inputs(spec, n=4, data_root=str(tmp_path))
        assert samples.shape == (4, *shape)
        assert torch.allclose(samples[2], test[2][0])
