"""A small U-Net style encoder-decoder for per-pixel output.

Encoder: Conv-BN-ReLU pairs with max-pool down. Decoder: the deeper up-step is a
ConvTranspose(2x2, stride 2)-BN-ReLU, the shallower a bilinear interpolate followed by
Conv-BN-ReLU, so folding meets a transposed conv and export meets a Resize. Output: one
logit map per class (1 channel: foreground logit for a binary mask).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bnfold.models.layers import check_norm, check_positive
from bnfold.models.registry import register


class UNet(nn.Module):
    def __init__(self, num_classes: int = 1, in_channels: int = 1, *, base: int = 16, norm: str = "bn",
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        check_norm(norm)
        check_positive(num_classes=num_classes, in_channels=in_channels, base=base)
        self._bn = norm == "bn"
        self._momentum, self._eps = bn_momentum, bn_eps
        c = base
        self.enc1 = self._double(in_channels, c)
        self.enc2 = self._double(c, 2 * c)
        self.bottleneck = self._double(2 * c, 4 * c)
        self.down = nn.MaxPool2d(2)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2, bias=not self._bn),
                                 *self._norm_act(2 * c))
        self.dec2 = self._double(4 * c, 2 * c)
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                 *self._conv_bn_relu(2 * c, c))
        self.dec1 = self._double(2 * c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def _norm_act(self, channels: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(channels, eps=self._eps, momentum=self._momentum)] if self._bn else []
        return norm + [nn.ReLU(inplace=True)]

    def _conv_bn_relu(self, cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=not self._bn), *self._norm_act(cout)]

    def _double(self, cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(*self._conv_bn_relu(cin, cout), *self._conv_bn_relu(cout, cout))

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.down(e1))
        b = self.bottleneck(self.down(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


@register("unet")
def unet(**kwargs) -> UNet:
    """Small U-Net; kwargs: num_classes (output channels, 1 = binary mask), in_channels, base, norm, bn_*.

    Input height and width must be multiples of 4.
    """
    return UNet(**kwargs)
