"""Registry and architectures: names, shapes, BN placement, train/eval behaviour of BN."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bnfold import models
from bnfold.errors import BnfoldError
from bnfold.models.registry import register

ALL = ["lenet", "resnet18", "resnet20", "resnet32", "resnet34", "resnet50", "resnet56", "unet"]


def test_list_models_has_every_contract_name():
    assert set(ALL) <= set(models.list_models())
    assert models.list_models() == sorted(models.list_models())


def test_unknown_name_lists_the_choices():
    with pytest.raises(BnfoldError) as info:
        models.build("resnet19")
    message = str(info.value)
    assert "resnet19" in message
    for name in ALL:
        assert name in message


def test_duplicate_registration_is_refused():
    with pytest.raises(BnfoldError, match="already registered"):
        @register("lenet")
        def another_lenet(**kwargs):  # pragma: no cover - never called
            return nn.Identity()
    assert models.build("lenet").__class__.__name__ == "LeNet"  # the original survived


def test_bad_keyword_names_the_model():
    with pytest.raises(BnfoldError, match="resnet20"):
        models.build("resnet20", activation="sigmoid")


@pytest.mark.parametrize("name,shape,out", [
    ("lenet", (2, 1, 28, 28), (2, 10)),
    ("resnet20", (2, 3, 32, 32), (2, 10)),
    ("resnet32", (2, 3, 32, 32), (2, 10)),
    ("unet", (2, 1, 32, 32), (2, 1, 32, 32)),
])
def test_output_shapes(name, shape, out):
    model = models.build(name).eval()
    with torch.no_grad():
        assert tuple(model(torch.randn(*shape)).shape) == out


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_resnets_small_input_variant(name):
    small = models.build(name, small_input=True, num_classes=7)
    large = models.build(name, num_classes=7)
    assert isinstance(small.stem[0], nn.Conv2d) and small.stem[0].kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    assert large.stem[0].kernel_size == (7, 7) and isinstance(large.stem[-1], nn.MaxPool2d)
    with torch.no_grad():
        assert small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_resnet_depths_and_conv_bn_relu_order():
    def blocks(model):
        return sum(len(stage) for stage in model.layers)
    assert blocks(models.build("resnet20")) == 9
    assert blocks(models.build("resnet56")) == 27
    assert blocks(models.build("resnet34")) == 16
    block = models.build("resnet20").layers[1][0]
    assert isinstance(block.conv1, nn.Conv2d) and block.conv1.bias is None  # BN follows: no bias
    assert isinstance(block.downsample[0], nn.Conv2d) and isinstance(block.downsample[1], nn.BatchNorm2d)


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    model = models.build("resnet20", zero_init_residual=True)
    for stage in model.layers:
        for block in stage:
            assert torch.count_nonzero(block.bn2.weight) == 0
            assert torch.count_nonzero(block.bn1.weight) == block.bn1.num_features


def test_lenet_classic_layout():
    model = models.build("lenet", activation="sigmoid")
    types = [type(m) for m in model.modules() if not isinstance(m, (nn.Sequential, type(model)))]
    assert types == [nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid, nn.AvgPool2d,
                     nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid, nn.AvgPool2d,
                     nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.Sigmoid,
                     nn.Linear, nn.BatchNorm1d, nn.Sigmoid, nn.Linear]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84), (84, 10)]


def test_lenet_options():
    assert any(isinstance(m, nn.ReLU) for m in models.build("lenet").modules())  # the default
    plain = models.build("lenet", norm="none", activation="tanh", pool="max", in_channels=3, input_size=32)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert any(isinstance(m, nn.Tanh) for m in plain.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in plain.modules())
    assert plain.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    for bad in ({"activation": "gelu"}, {"pool": "sum"}, {"norm": "ln"}, {"num_classes": 0}):
        with pytest.raises(BnfoldError, match=str(next(iter(bad.values())))):
            models.build("lenet", **bad)


def test_unet_has_both_upsampling_paths():
    model = models.build("unet")
    assert isinstance(model.up2[0], nn.ConvTranspose2d) and isinstance(model.up2[1], nn.BatchNorm2d)
    assert isinstance(model.up1[0], nn.Upsample) and model.up1[0].mode == "bilinear"
    assert isinstance(model.up1[1], nn.Conv2d) and isinstance(model.up1[2], nn.BatchNorm2d)


def test_bn_momentum_and_eps_reach_every_bn():
    for name in ("lenet", "resnet20", "unet"):
        model = models.build(name, bn_momentum=0.03, bn_eps=1e-3)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(m.momentum == 0.03 and m.eps == 1e-3 for m in bns)


def test_bn_running_stats_change_in_train_and_not_in_eval():
    torch.manual_seed(0)
    model = models.build("lenet")
    x = torch.randn(16, 1, 28, 28) * 3 + 1
    bn = model.features[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    model.eval()
    with torch.no_grad():
        first = model(x)
        second = model(x[:4])
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.allclose(first[:4], second, atol=1e-6)  # eval: a sample's output ignores its batch
    model.train()
    with torch.no_grad():
        model(x)
    assert not torch.allclose(bn.running_mean, before[0])
    assert not torch.allclose(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == 1
    with torch.no_grad():  # train: batch statistics, so the same sample differs with its batch-mates
        assert not torch.allclose(model(x)[:4], model(x[:4]), atol=1e-4)


def test_create_sizes_models_for_digits():
    cases = {"lenet": [1, 28, 28], "resnet20": [3, 32, 32], "resnet18": [3, 32, 32], "unet": [1, 32, 32]}
    for arch, shape in cases.items():
        model, spec = models.build_for_dataset(arch, "digits")
        assert spec.input_shape == shape and spec.epoch == 0 and spec.dataset == "digits"
        assert len(spec.preprocess.mean) == shape[0] == len(spec.preprocess.std)
        rebuilt = models.build(spec.arch, **spec.arch_kwargs)
        assert rebuilt.state_dict().keys() == model.state_dict().keys()
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *shape))
        assert out.shape == ((1, 1, 32, 32) if arch == "unet" else (1, 10))
    _, spec = models.build_for_dataset("unet")
    assert spec.task == "segmentation" and spec.labels == ["background", "foreground"]
    _, spec = models.build_for_dataset("resnet18")
    assert spec.arch_kwargs["small_input"] is True


def test_create_input_size_override():
    model, spec = models.build_for_dataset("resnet18", input_size=224)  # ImageNet-style stem above 64 pixels
    assert spec.input_shape == [3, 224, 224] and spec.arch_kwargs["small_input"] is False
    assert model.stem[0].kernel_size == (7, 7)
    model, spec = models.build_for_dataset("lenet", input_size=32)
    assert spec.input_shape == [1, 32, 32]
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
