"""The training loop on a tiny budget: files, reproducibility, resume, NaN stop, all three tasks."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bnfold import models
from bnfold.errors import BnfoldError
from bnfold.models.training import TrainingError, resolve_device


def tiny(out, **overrides) -> models.TrainConfig:
    # One thread (threads=0 would take every CPU, and fight the other xdist worker for them).
    base = dict(out=str(out), epochs=1, steps_per_epoch=2, batch_size=32, progress=False, device="cpu", threads=1)
    base.update(overrides)
    return models.TrainConfig(**base)


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_train_writes_checkpoints_metrics_and_curves(tmp_path):
    result = models.train(tiny(tmp_path / "run", epochs=2))
    out = tmp_path / "run"
    assert result.best == out / "best.pt" and result.last == out / "last.pt"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] == [r["epoch"] for r in result.history]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["train_loss"] > 0 for r in lines)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, spec = models.load_checkpoint(result.last)
    assert spec.epoch == 2 and spec.metrics["test_accuracy"] == lines[-1]["test_accuracy"]
    assert result.spec.epoch == 2
    best_epoch = max(lines, key=lambda r: r["test_accuracy"])["epoch"]
    assert models.load_checkpoint(result.best)[1].epoch == best_epoch
    # Training ran in train mode: BN learned running statistics, one update per step.
    bn = model.features[1]
    assert int(bn.num_batches_tracked) == 4
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    # Training changed the weights.
    fresh, _ = models.build_for_dataset("lenet")
    assert not torch.equal(fresh.state_dict()["features.0.weight"], model.state_dict()["features.0.weight"])


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = models.train(tiny(tmp_path / "a", seed=5))
    b = models.train(tiny(tmp_path / "b", seed=5))
    c = models.train(tiny(tmp_path / "c", seed=6))
    wa, wb, wc = _weights(a.last), _weights(b.last), _weights(c.last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_continues_exactly(tmp_path):
    """1 epoch, then --resume to 2, equals 2 epochs straight: model, optimizer, RNG all restored."""
    straight = models.train(tiny(tmp_path / "straight", epochs=2, schedule="none"))
    models.train(tiny(tmp_path / "split", epochs=1, schedule="none"))
    resumed = models.train(tiny(tmp_path / "split", epochs=2, schedule="none", resume=True))
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    ws, wr = _weights(straight.last), _weights(resumed.last)
    for key in ws:
        assert torch.equal(ws[key], wr[key]), key
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


@pytest.mark.parametrize("schedule, epochs", [("cosine", 3), ("step", 4)])
def test_resume_with_more_epochs_follows_the_longer_schedule(tmp_path, schedule, epochs):
    """A finished 1-epoch run resumed to more epochs (what "nothing to do: raise --epochs" asks for)
    gets the rates of a run planned that long from the start, not the old schedule's end (cosine: 0)."""
    straight = models.train(tiny(tmp_path / "straight", epochs=epochs, schedule=schedule))
    models.train(tiny(tmp_path / "split", epochs=1, schedule=schedule))
    resumed = models.train(tiny(tmp_path / "split", epochs=epochs, schedule=schedule, resume=True))
    planned = [r["lr"] for r in straight.history]
    got = [r["lr"] for r in resumed.history]
    assert got == pytest.approx(planned, rel=1e-12, abs=1e-15)
    assert all(lr > 0 for lr in got)


def test_resume_refusals(tmp_path):
    with pytest.raises(TrainingError, match="last.pt"):
        models.train(tiny(tmp_path / "none", resume=True))
    models.train(tiny(tmp_path / "run"))
    with pytest.raises(TrainingError, match="nothing to do"):
        models.train(tiny(tmp_path / "run", resume=True))
    with pytest.raises(TrainingError, match="resnet20"):
        models.train(tiny(tmp_path / "run", model="resnet20", epochs=2, resume=True))


def test_nan_loss_stops_naming_epoch_and_step(tmp_path):
    config = tiny(tmp_path / "nan", epochs=2, steps_per_epoch=5, optimizer="sgd", lr=1e12, norm="none")
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step \d"):
        models.train(config)


def test_option_errors_name_the_value(tmp_path):
    for overrides, text in [({"epochs": 0}, "epochs"), ({"optimizer": "lion"}, "lion"),
                            ({"schedule": "linear"}, "linear"), ({"lr": -1.0}, "-1"),
                            ({"bn_momentum": 2.0}, "bn_momentum"), ({"device": "tpu"}, "tpu"),
                            ({"model": "vgg"}, "vgg")]:
        with pytest.raises(BnfoldError, match=text):
            models.train(tiny(tmp_path / "bad", **overrides))


def test_cuda_asked_for_and_absent_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(BnfoldError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


def test_sync_bn_refused_on_cpu(tmp_path):
    with pytest.raises(BnfoldError, match="SyncBatchNorm.*GPU"):
        models.train(tiny(tmp_path / "sync", sync_bn=True))


def test_bn_options_reach_the_checkpoint(tmp_path):
    result = models.train(tiny(tmp_path / "bn", bn_momentum=0.05, bn_eps=1e-3, activation="sigmoid"))
    model, spec = models.load_checkpoint(result.last)
    assert spec.arch_kwargs["bn_eps"] == 1e-3 and spec.arch_kwargs["activation"] == "sigmoid"
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.05 for m in bns)


@pytest.mark.slow
@pytest.mark.parametrize("arch,metric", [("resnet20", "test_accuracy"), ("unet", "test_iou")])
def test_resnet_and_unet_train_steps(tmp_path, arch, metric):
    result = models.train(tiny(tmp_path / arch, model=arch, batch_size=16))
    assert 0.0 <= result.final[metric] <= 1.0
    model, spec = models.load_checkpoint(result.best)
    assert spec.arch == arch and metric in spec.metrics


@pytest.mark.gpu
def test_training_on_cuda_saves_a_cpu_loadable_checkpoint(tmp_path):
    result = models.train(tiny(tmp_path / "cuda", device="cuda"))
    payload = torch.load(result.last, weights_only=True)
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())
    model, _ = models.load_checkpoint(result.last)
    assert int(model.features[1].num_batches_tracked) == 2
