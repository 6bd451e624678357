"""ResNets with BatchNorm, Conv -> BN -> ReLU order.

CIFAR-style `resnet20/32/56` (3x3 stem, three stages of 16/32/64 channels, He et al. 2016
section 4.2) and ImageNet-style `resnet18/34/50` (7x7 stem + max-pool, or with
`small_input=True` a 3x3 stride-1 stem and no max-pool, for 32x32 images). Shortcuts that change
shape are 1x1 Conv + BN (option B), so every BN has a conv in front of it to fold into.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from bnfold.models.layers import check_norm, check_positive
from bnfold.models.registry import register

NormFactory = Callable[[int], nn.Module]


def _norm_factory(norm: str, momentum: float, eps: float) -> NormFactory:
    check_norm(norm)
    if norm == "bn":
        return partial(nn.BatchNorm2d, eps=eps, momentum=momentum)
    return lambda channels: nn.Identity()


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, *, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: NormFactory, bias: bool) -> None:
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride, bias=bias)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3, bias=bias)
        self.bn2 = norm(planes)
        self.downsample = _shortcut(cin, planes, stride, norm, bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))

    def last_bn(self) -> nn.Module:
        return self.bn2


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: NormFactory, bias: bool) -> None:
        super().__init__()
        width = planes
        self.conv1 = _conv(cin, width, 1, bias=bias)
        self.bn1 = norm(width)
        self.conv2 = _conv(width, width, 3, stride, bias=bias)  # stride on the 3x3, as torchvision v1.5
        self.bn2 = norm(width)
        self.conv3 = _conv(width, planes * self.expansion, 1, bias=bias)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * self.expansion, stride, norm, bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))

    def last_bn(self) -> nn.Module:
        return self.bn3


def _shortcut(cin: int, cout: int, stride: int, norm: NormFactory, bias: bool) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), norm(cout))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], widths: list[int], *,
                 num_classes: int, in_channels: int, stem: str, norm: str = "bn",
                 zero_init_residual: bool = False, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        norm_layer = _norm_factory(norm, bn_momentum, bn_eps)
        bias = norm == "none"
        if stem == "cifar":  # 3x3 stride 1, no max-pool: keeps 32x32 detail
            self.stem = nn.Sequential(_conv(in_channels, widths[0], 3, bias=bias), norm_layer(widths[0]),
                                      nn.ReLU(inplace=True))
        else:  # ImageNet: 7x7 stride 2 + 3x3 max-pool stride 2
            self.stem = nn.Sequential(_conv(in_channels, widths[0], 7, 2, bias=bias), norm_layer(widths[0]),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        stages = []
        cin = widths[0]
        for index, (count, width) in enumerate(zip(layers, widths)):
            blocks = []
            for b in range(count):
                stride = 2 if (b == 0 and index > 0) else 1
                blocks.append(block(cin, width, stride, norm_layer, bias))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity (Goyal et al.).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and isinstance(m.last_bn(), nn.BatchNorm2d):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def _cifar_resnet(depth: int, *, num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes=num_classes, in_channels=in_channels,
                  stem="cifar", **kwargs)


def _resnet(block: type[BasicBlock] | type[Bottleneck], layers: list[int], *, num_classes: int = 10,
            in_channels: int = 3, small_input: bool = False, **kwargs) -> ResNet:
    return ResNet(block, layers, [64, 128, 256, 512], num_classes=num_classes, in_channels=in_channels,
                  stem="cifar" if small_input else "imagenet", **kwargs)


@register("resnet20")
def resnet20(**kwargs) -> ResNet:
    """CIFAR ResNet-20 (0.27 M parameters); kwargs: num_classes, in_channels, norm, zero_init_residual, bn_*."""
    return _cifar_resnet(20, **kwargs)


@register("resnet32")
def resnet32(**kwargs) -> ResNet:
    return _cifar_resnet(32, **kwargs)


@register("resnet56")
def resnet56(**kwargs) -> ResNet:
    return _cifar_resnet(56, **kwargs)


@register("resnet18")
def resnet18(**kwargs) -> ResNet:
    """ImageNet ResNet-18; `small_input=True` for 32x32 images (3x3 stem, no max-pool)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register("resnet34")
def resnet34(**kwargs) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register("resnet50")
def resnet50(**kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)
