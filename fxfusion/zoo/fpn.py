"""A small conv backbone with a Feature Pyramid Network on top.

The backbone gives C2..C5 at strides 4..32. The FPN projects each with a 1x1 ``lateral`` conv
and merges top-down, ``p_i = lateral_i(c_i) + F.interpolate(p_{i+1}, size=c_i.shape[-2:],
mode="nearest")``, then smooths every level with a 3x3 ``output`` conv. The three top-down adds
(P4, P3, P2) are the fusion sites; the ``shape[-2:]`` that sizes the interpolation is shape
arithmetic, not a site. The output is the tuple (P2, P3, P4, P5), all ``out_channels`` wide.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxfusion.zoo.common import ConvBNAct, init_bn_stats

__all__ = ["FPN", "FPNNet", "TinyBackbone", "fpn_tiny"]


class TinyBackbone(nn.Module):
    """Four stride-2 stages after a stride-2 stem; returns C2, C3, C4, C5."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        self.stem = ConvBNAct(in_channels, widths[0], 3, 2)
        c_in = widths[0]
        stages = []
        for c in widths:
            stages.append(nn.Sequential(ConvBNAct(c_in, c, 3, 2), ConvBNAct(c, c, 3)))
            c_in = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class FPN(nn.Module):
    """Top-down pathway with lateral 1x1 convs, nearest upsampling adds and 3x3 output convs."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int = 16) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        p = self.lateral[-1](feats[-1])
        results = [self.output[-1](p)]
        for i in range(len(feats) - 2, -1, -1):
            c = feats[i]
            p = self.lateral[i](c) + F.interpolate(p, size=c.shape[-2:], mode="nearest")
            results.insert(0, self.output[i](p))
        return tuple(results)


class FPNNet(nn.Module):
    """``TinyBackbone`` followed by ``FPN``; returns the pyramid (P2, P3, P4, P5)."""

    def __init__(
        self,
        in_channels: int = 3,
        widths: tuple[int, ...] = (8, 16, 24, 32),
        out_channels: int = 16,
    ) -> None:
        super().__init__()
        self.backbone = TinyBackbone(in_channels, widths)
        self.fpn = FPN(widths, out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fpn(self.backbone(x))


def fpn_tiny(**kwargs: Any) -> FPNNet:
    """Four-level FPN (16 channels, strides 4-32) over a Conv-BN-ReLU backbone, 64 px inputs."""
    model = FPNNet(**kwargs)
    init_bn_stats(model, (8, kwargs.get("in_channels", 3), 64, 64))
    return model
