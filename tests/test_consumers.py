"""find follows a site's feature axis through views, transposes, chunks and indexing, inside a
module and across module boundaries (issue 14, class 2: ShuffleNetV2's channel shuffle)."""

from __future__ import annotations

import torch
from torch import nn

import fxfusion


class ShuffleBlock(nn.Module):
    """cat of two branches, then the channel shuffle view -> transpose -> view."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c // 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        b, c, h, w = y.size()
        return y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


class SplitBlock(nn.Module):
    """ShuffleNetV2's next unit: chunk the channels, convolve one half, cat back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c // 2, c // 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return torch.cat((x1, self.conv(x2)), 1)


class Net(nn.Module):
    def __init__(self, spatial: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.s1, self.s2 = ShuffleBlock(8), SplitBlock(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.s2(self.s1(self.stem(x))))


class Untraceable(Net):
    """The root branches on data: s1 and s2 are units of their own, so the axis must be followed
    out of s1's graph (by value) and into s2 (by the example forward's autograd graph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        if float(y.detach().abs().sum()) < 0:
            y = -y
        return self.head(self.s2(self.s1(y)))


def test_channel_shuffle_keeps_the_site() -> None:
    x = torch.randn(2, 3, 8, 8)
    for model in (Net().eval(), Untraceable().eval()):
        report = fxfusion.find_fusions(model, x)
        assert [s.name for s in report.sites] == ["s1.gabfusion0", "s2.gabfusion0"], str(report)
        assert report.sites[0].axis == 1


class Tokens(nn.Module):
    """cat along channels, then (N, C, H, W) -> (N, HW, C): a Linear reads the channels as features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).flatten(2).transpose(1, 2))


class MixedView(nn.Module):
    """cat along channels, then a view that mixes channels with positions before a conv reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.conv = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.conv(y.reshape(y.shape[0], 8, 16).transpose(1, 2).reshape(y.shape[0], 8, 4, 4))


def test_tokens_read_the_channels_and_a_mixing_view_does_not() -> None:
    x = torch.randn(2, 3, 4, 4)
    assert len(fxfusion.find_fusions(Tokens().eval(), x)) == 1
    report = fxfusion.find_fusions(MixedView().eval(), x)
    assert not report.sites and "reaches no learnable layer" in report.refused[0].reason


def test_the_default_rewrite_of_a_shuffle_site_keeps_the_model() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = Net().eval()
    rewritten = fxfusion.rewrite(model, x, fold="any")
    assert len([m for m in rewritten.modules() if isinstance(m, fxfusion.GABFusion)]) == 2
    assert torch.equal(rewritten.eval()(x), model(x))
