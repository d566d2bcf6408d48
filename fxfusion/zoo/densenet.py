"""A small DenseNet-BC: two dense blocks joined by a transition, then BN-ReLU, pooling and fc.

Each dense layer is BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 and grows the feature map by concatenation,
``x = torch.cat([x, new], 1)``. Every such cat is a fusion site, because its result goes into a
BatchNorm: the next layer's ``norm1``, the transition's ``norm`` or the final ``norm5``. With
``block_config=(3, 3)`` that is 6 sites (``block{1,2}.layer{1,2,3}``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxfusion.zoo.common import init_bn_stats

__all__ = ["DenseBlock", "DenseLayer", "DenseNet", "Transition", "densenet_tiny"]


class DenseLayer(nn.Module):
    """Bottleneck layer BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 whose output is appended to its input."""

    def __init__(self, c1: int, growth_rate: int, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c1, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(new)))
        return torch.cat([x, new], 1)


class DenseBlock(nn.Sequential):
    """``num_layers`` dense layers; the width grows by ``growth_rate`` per layer."""

    def __init__(self, num_layers: int, c1: int, growth_rate: int, bn_size: int = 4) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"layer{i + 1}", DenseLayer(c1 + i * growth_rate, growth_rate, bn_size))


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 that compresses the width, then 2x2 average pooling."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c1, c2, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC with a conv stem, dense blocks separated by transitions, and a classifier."""

    def __init__(
        self,
        growth_rate: int = 8,
        block_config: tuple[int, ...] = (3, 3),
        num_init_features: int = 16,
        bn_size: int = 4,
        compression: float = 0.5,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, num_init_features, 3, 2, padding=1, bias=False),
            nn.BatchNorm2d(num_init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.features = nn.Sequential()
        c = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"block{i + 1}", DenseBlock(num_layers, c, growth_rate, bn_size))
            c += num_layers * growth_rate
            if i != len(block_config) - 1:
                c_out = int(c * compression)
                self.features.add_module(f"transition{i + 1}", Transition(c, c_out))
                c = c_out
        self.norm5 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        x = self.pool(self.relu(self.norm5(x)))
        return self.classifier(torch.flatten(x, 1))


def densenet_tiny(**kwargs: Any) -> DenseNet:
    """DenseNet-BC with two 3-layer dense blocks, growth rate 8, 10 classes, 64 px inputs."""
    model = DenseNet(**kwargs)
    init_bn_stats(model, (8, kwargs.get("in_channels", 3), 64, 64))
    return model
