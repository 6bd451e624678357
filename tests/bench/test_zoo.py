"""`python -m bnfold.bench.zoo`: per-model coverage rows and the totals table."""
from __future__ import annotations

import torch
from torch import nn

from bnfold.bench.zoo import main, randomize_batchnorm, run_model, summary


def test_a_torchvision_model_row() -> None:
    row = run_model("tv:resnet18")
    assert row.error is None and row.batchnorms == 20 and row.left == 0 and row.unreported == 0
    assert row.max_rel_error is not None and row.max_rel_error <= 1e-5
    assert row.f64_max_rel_error is not None and row.f64_max_rel_error <= 1e-10  # exact in float64
    assert row.own_f32_error is not None and 0 < row.own_f32_error <= 1e-5
    assert row.fx_error is None and row.fx_left == 0  # torch.fx fuse folds a plain resnet too
    assert row.input_shape == (1, 3, 64, 64)


def test_detection_model_is_built_with_frozen_batchnorm_and_fx_fails_on_it() -> None:
    row = run_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn")
    assert row.error is None and row.batchnorms > 0 and row.left == 0, row
    assert row.fx_error and row.fx_left == row.batchnorms  # fuse cannot trace detection models


def test_unknown_models_are_rows_with_a_build_error_and_totals_say_so(capsys) -> None:
    row = run_model("tv:no_such_model")
    assert row.error and row.error.startswith("build")
    table = summary([row, run_model("nowhere:x")])
    assert "not built" in table
    assert main(["--models", "tv:shufflenet_v2_x0_5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| tv:shufflenet_v2_x0_5 |" in out and "| torchvision | 1 (1 with BN; +0 not built) |" in out


def test_randomize_batchnorm_draws_every_bn_like_module() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d
    model = randomize_batchnorm(nn.Sequential(nn.BatchNorm2d(3), FrozenBatchNorm2d(3), nn.BatchNorm1d(2, affine=False)))
    for m in model:
        assert not torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert (m.running_var >= 0.25).all() and (m.running_var < 1.75).all()
    assert not torch.equal(model[1].weight, torch.ones(3))
    assert model[2].weight is None  # affine=False: nothing invented
