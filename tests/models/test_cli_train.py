"""`bnfold train` from the command line, on a tiny budget."""
from __future__ import annotations

import json

import pytest
import torch

from bnfold import models
from bnfold.cli import main


def test_bnfold_train_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "lenet", "--dataset", "digits", "--epochs", "1", "--steps-per-epoch", "2",
                 "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "step",
                 "--seed", "3", "--device", "cpu", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "epoch 1/1" in printed and "test_accuracy" in printed and str(out / "best.pt") in printed
    model, spec = models.load_checkpoint(out / "best.pt")
    assert spec.arch == "lenet" and spec.epoch == 1
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["lr"] == pytest.approx(0.05)
    config = torch.load(out / "last.pt", weights_only=True)["config"]
    assert config["optimizer"] == "sgd" and config["seed"] == 3


@pytest.mark.parametrize("argv,text", [
    (["--model", "alexnet"], "alexnet"),
    (["--dataset", "mnist", "--data-root", "{tmp}/empty"], "--download"),
    (["--dataset", "imagefolder:{tmp}/missing"], "does not exist"),
    (["--epochs", "0"], "epochs"),
])
def test_bnfold_train_cli_errors_exit_2_without_traceback(tmp_path, capsys, argv, text):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["train", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert text in err and "Traceback" not in err


def test_bnfold_train_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--dataset", "--resume", "--sync-bn", "--bn-momentum", "--steps-per-epoch"):
        assert option in text


def test_train_into_a_folder_holding_a_run_needs_resume_or_force(tmp_path, capsys):
    """It used to overwrite best.pt silently: a trained model lost to a repeated command."""
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "16", "--device", "cpu",
            "--no-progress", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    before = {name: (out / name).read_bytes() for name in ("best.pt", "last.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert main([*argv, "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--force" in err and "Traceback" not in err
    assert {name: (out / name).read_bytes() for name in before} == before  # byte-identical
    assert main([*argv, "--seed", "7", "--force"]) == 0
    assert (out / "best.pt").read_bytes() != before["best.pt"]


def _pets(root, per_class: int = 5):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 80, (20, 24, 3), dtype=np.uint8) + np.uint8(120 * k)
            Image.fromarray(arr, "RGB").save(root / name / f"{i}.png")
    return root


def test_imagefolder_with_a_corrupt_png_trains_and_names_it(tmp_path, capsys):
    root = _pets(tmp_path / "pets")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated mid-file
    code = main(["train", "--model", "resnet20", "--dataset", f"imagefolder:{root}", "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "4", "--device", "cpu", "--no-progress",
                 "--threads", "1", "--input-size", "16", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "skipped 2 unreadable image(s)" in captured.err
    assert str(root / "dog" / "broken.png") in captured.err and str(root / "cat" / "cut.png") in captured.err
    assert "Traceback" not in captured.err
    assert "2 classes (cat, dog); train 8, eval 2 samples; input shape 3x16x16" in captured.out


def test_imagefolder_with_an_empty_class_is_one_line_exit_2(tmp_path, capsys):
    root = _pets(tmp_path / "pets")
    (root / "bird").mkdir()
    (root / "bird" / "notes.txt").write_text("no images here")
    code = main(["train", "--model", "resnet20", "--dataset", f"imagefolder:{root}", "--epochs", "1",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "class folder(s) bird hold no readable image" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "best.pt").exists()


def test_imagefolder_too_small_to_split_names_the_class_folders(tmp_path, capsys):
    # sklearn's own words named the class by its index ("Classes with too few members are: [1]").
    root = _pets(tmp_path / "pets", per_class=4)
    for extra in ("1.png", "2.png", "3.png"):
        (root / "dog" / extra).unlink()
    code = main(["train", "--model", "resnet20", "--dataset", f"imagefolder:{root}", "--epochs", "1",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "5 images in 2 class folders, the fewest in 'dog' (1), 'cat' (4)" in err and "PATH/train/<class>/" in err
