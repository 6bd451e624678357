"""Third-party networks as their libraries build them (no weights), every BatchNorm-like module
randomized first: torchvision's detection models with frozen BN and video models, and timm's
families whose BatchNorms are BN + activation modules, frozen, behind "same" padding or on tokens.

Each must fold to no BatchNorm left, or report every one left exactly once, within 1e-5."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from bnfold import compare, count_batchnorm, fold
from bnfold.bench.zoo import freeze_batchnorm


def _check(model: nn.Module, inputs: torch.Tensor, randomize_bn, *, left: int = 0,
           ill_conditioned: bool = False) -> None:
    """Within 1e-5 in float32; exact (1e-10) in float64, which tells a wrong fold apart from float32
    rounding. `ill_conditioned`: a network whose own float32 outputs are further than 1e-5 from its
    float64 ones; the folded float32 model must then be about as close to the float64 truth as the
    original (within a factor 5: measured 4.0, 0.9, 1.7 for mixnet_s seeds 0-2), instead of within
    1e-5 of the original."""
    model = randomize_bn(model).eval()
    before = count_batchnorm(model)
    folded, report = fold(model)
    names = [n for n, _ in report.skipped]
    assert before > 0 and count_batchnorm(folded) == left, str(report)
    assert len(names) == len(set(names)) == left and report.ok == (left == 0), str(report)
    assert len(report.folded) == before - left
    name = type(model).__name__
    if ill_conditioned:
        truth = copy.deepcopy(model).double()
        own = compare(truth, model, inputs.double()).max_rel_error
        compare(truth, folded, inputs.double()).check(5 * own, f"folded {name} against float64")
    else:
        compare(model, folded, inputs).check(1e-5, f"folded {name}")
    model = model.double()
    compare(model, fold(model)[0], inputs.double()).check(1e-10, f"folded {name} in float64")


def test_faster_rcnn_with_frozen_batchnorm(randomize_bn) -> None:
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)
    torch.manual_seed(0)
    model = randomize_bn(freeze_batchnorm(model)).eval()
    assert count_batchnorm(model) == 53 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded, report = fold(model)
    assert count_batchnorm(folded) == 0 and report.ok and len(report.folded) == 53, str(report)
    # Boxes go through NMS, which amplifies rounding; the backbone carries every folded layer.
    compare(model.backbone, folded.backbone, torch.randn(1, 3, 64, 64)).check(1e-5, "folded Faster R-CNN backbone")


@pytest.mark.parametrize("name", ["r3d_18", pytest.param("r2plus1d_18", marks=pytest.mark.extended)])
def test_video_resnets_whose_convs_subclass_conv3d(name: str, randomize_bn) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models.video, name)(weights=None, num_classes=10)
    _check(model, torch.randn(1, 3, 4, 32, 32), randomize_bn)


def test_googlenet_training_only_aux_heads_are_reported_once(randomize_bn) -> None:
    # In eval mode GoogLeNet never calls its auxiliary classifiers: their BNs stay, each reported.
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    _check(model, torch.randn(1, 3, 64, 64), randomize_bn, left=2)


@pytest.mark.parametrize("name, size", [
    ("efficientnet_b0", 64),  # BatchNormAct2d everywhere
    ("mobilenetv3_small_050", 64),
    ("tf_efficientnet_b0", 64),  # Conv2dSame: TF "same" padding computed in forward
    pytest.param("cspresnet50", 64, marks=pytest.mark.extended),   # one more deep timm net: nightly
    pytest.param("levit_128s", 224, marks=pytest.mark.slow),  # LinearNorm: BN1d on linear(x).flatten(0, 1)
])
def test_timm_models(name: str, size: int, randomize_bn) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    _check(timm.create_model(name, pretrained=False, num_classes=10), torch.randn(1, 3, size, size), randomize_bn)


def test_timm_mixnet_batchnorm_after_concatenated_convs(randomize_bn) -> None:
    # MixedConv2d: a BN after the cat of convs. With randomized statistics mixnet_s is ill-conditioned
    # in float32: the unfolded model is 1.1e-5 from its float64 self, the folded one 4.4e-5 (seed 0);
    # in float64 the fold is exact (2e-14).
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    _check(timm.create_model("mixnet_s", pretrained=False, num_classes=10), torch.randn(1, 3, 64, 64), randomize_bn,
           ill_conditioned=True)


def test_timm_frozen_batchnorm(randomize_bn) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # FrozenBatchNormAct2d (from BatchNormAct2d) and torchvision's FrozenBatchNorm2d.
    model = timm.layers.freeze_batch_norm_2d(timm.create_model("mobilenetv3_small_050", pretrained=False))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FrozenBatchNormAct2d" in kinds and "BatchNormAct2d" not in kinds
    _check(model, torch.randn(1, 3, 64, 64), randomize_bn)
    resnet = timm.layers.freeze_batch_norm_2d(timm.create_model("resnet18", pretrained=False))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in resnet.modules())
    _check(resnet, torch.randn(1, 3, 64, 64), randomize_bn)
