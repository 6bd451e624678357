"""Past one machine: SyncBatchNorm there and back, and a real 2-process gloo run under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from bnfold import models
from bnfold.models.distributed import DistContext, from_sync_batchnorm, to_sync_batchnorm


@pytest.mark.parametrize("arch", ["lenet", "resnet20", "unet"])
def test_sync_batchnorm_conversion_round_trip_keeps_stats_and_params(randomize_bn, arch):
    model, spec = models.build_for_dataset(arch)
    randomize_bn(model, seed=11)
    original = {name: type(m) for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = models.sample_inputs(spec, n=4)
    with torch.no_grad():
        expected = model.eval()(x)

    synced = to_sync_batchnorm(model)
    kinds = {name: type(m) for name, m in synced.named_modules() if name in original}
    assert set(kinds.values()) == {nn.SyncBatchNorm}
    back = from_sync_batchnorm(synced)
    assert {name: type(m) for name, m in back.named_modules() if name in original} == original
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    for key, value in back.state_dict().items():
        assert torch.equal(value, state[key]), key
    for name, cls in original.items():
        bn = back.get_submodule(name)
        assert bn.eps == 1e-5 and bn.momentum == 0.1
    with torch.no_grad():
        assert torch.equal(back.eval()(x), expected)


def test_dist_context_reads_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = DistContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.enabled, ctx.is_main) == (1, 2, 1, True, False)
    monkeypatch.delenv("WORLD_SIZE")
    assert not DistContext.from_env().enabled


def _torchrun(tmp_path, *extra: str, nproc: int = 2, device: str = "cpu") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "bnfold.cli", "train", "--model", "lenet", "--epochs", "1", "--steps-per-epoch", "3",
           "--batch-size", "16", "--device", device, "--no-progress", "--out", str(tmp_path / "ddp"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    proc = _torchrun(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "distributed: 2 processes (gloo)" in proc.stdout
    assert proc.stdout.count("final epoch 1") == 1  # only rank 0 reports and writes
    out = tmp_path / "ddp"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    model, spec = models.load_checkpoint(out / "best.pt")
    assert spec.epoch == 1
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    # 3 steps per process; DDP keeps replicas identical, rank 0's BN saw its own 3 batches.
    assert int(model.features[1].num_batches_tracked) == 3
    assert json.loads((out / "metrics.jsonl").read_text())["epoch"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm under NCCL needs two CUDA devices")
def test_two_process_sync_bn_on_gpus(tmp_path):
    proc = _torchrun(tmp_path, "--sync-bn", device="cuda")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SyncBatchNorm" in proc.stdout
    model, _ = models.load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
