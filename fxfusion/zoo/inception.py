"""A small GoogLeNet-style network: a stem, two Inception blocks and a classifier.

An Inception block runs four branches on the same input (1x1; 1x1->3x3; 1x1->3x3->3x3, the
factorised 5x5 of Inception-v2; 3x3 max-pool->1x1) and joins them with one 4-way
``torch.cat(branches, 1)``. Both cats are fusion sites (2 in all): the first feeds the second
block's convs, the second feeds average pooling and then ``fc``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxfusion.zoo.common import ConvBNAct, init_bn_stats

__all__ = ["Inception", "InceptionNet", "inception_tiny"]


class Inception(nn.Module):
    """Four parallel branches concatenated along channels; the output width is their sum."""

    def __init__(
        self, c1: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.branch1 = ConvBNAct(c1, ch1x1, 1)
        self.branch2 = nn.Sequential(ConvBNAct(c1, ch3x3red, 1), ConvBNAct(ch3x3red, ch3x3, 3))
        self.branch3 = nn.Sequential(
            ConvBNAct(c1, ch5x5red, 1), ConvBNAct(ch5x5red, ch5x5, 3), ConvBNAct(ch5x5, ch5x5, 3)
        )
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), ConvBNAct(c1, pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)


class InceptionNet(nn.Module):
    """Conv stem, Inception 3a, max-pool, Inception 3b, average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvBNAct(in_channels, 16, 3, 2),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.inception3a = Inception(16, 8, 8, 12, 4, 6, 6)  # -> 32 channels
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception3b = Inception(32, 12, 12, 16, 6, 8, 8)  # -> 44 channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(44, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception3a(self.stem(x))
        x = self.inception3b(self.maxpool(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def inception_tiny(**kwargs: Any) -> InceptionNet:
    """Two-block Inception network (widths 16-44), 10 classes, 64 px inputs."""
    model = InceptionNet(**kwargs)
    init_bn_stats(model, (8, kwargs.get("in_channels", 3), 64, 64))
    return model
