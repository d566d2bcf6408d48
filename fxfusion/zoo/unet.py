"""A small U-Net: double convs on the way down, transposed convs up, skip connections by cat.

Every decoder stage concatenates the upsampled deeper map with the encoder map of the same size,
``torch.cat([up, skip], dim=1)``, and feeds the result to a double conv. With depth 3 that gives
3 fusion sites (``up3``, ``up2``, ``up1``), each the shallow-plus-deep join that the paper targets.
The output is per-pixel class logits of the input's spatial size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxfusion.zoo.common import ConvBNAct, init_bn_stats

__all__ = ["DoubleConv", "Down", "UNet", "Up", "unet_tiny"]


class DoubleConv(nn.Sequential):
    """Two 3x3 Conv-BN-ReLU layers."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__(ConvBNAct(c1, c2, 3), ConvBNAct(c2, c2, 3))


class Down(nn.Sequential):
    """2x2 max-pool, then a double conv."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(c1, c2))


class Up(nn.Module):
    """2x transposed conv, concatenation with the skip map, then a double conv."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c1, c2, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * c2, c2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net of depth 3 (three poolings, three skip cats), widths ``base * 2**level``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 8) -> None:
        super().__init__()
        c = [base * 2**level for level in range(4)]
        self.inc = DoubleConv(in_channels, c[0])
        self.down1 = Down(c[0], c[1])
        self.down2 = Down(c[1], c[2])
        self.down3 = Down(c[2], c[3])
        self.up3 = Up(c[3], c[2])
        self.up2 = Up(c[2], c[1])
        self.up1 = Up(c[1], c[0])
        self.outc = nn.Conv2d(c[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.up3(x4, x3)
        x = self.up2(x, x2)
        x = self.up1(x, x1)
        return self.outc(x)


def unet_tiny(**kwargs: Any) -> UNet:
    """Depth-3 U-Net with widths 8-64 for (3, 64, 64) inputs and 2 classes."""
    model = UNet(**kwargs)
    init_bn_stats(model, (8, kwargs.get("in_channels", 3), 64, 64))
    return model
