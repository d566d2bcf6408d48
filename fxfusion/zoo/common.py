"""Blocks shared by the reference models of the zoo.

YOLO-style layers (``Conv``, ``Concat``, ``SPPF``) are written the way the YOLOv5 and YOLOv8 code
bases write them, because fxfusion must handle those exact forms: ``Concat`` takes a *list* of
tensors, and ``Conv`` is Conv2d(bias=False) -> BatchNorm2d -> activation. ``ConvBNAct`` is the
torchvision-style variant with an explicit activation class, used by the classifiers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SPPF", "Concat", "Conv", "ConvBNAct", "autopad", "init_bn_stats", "make_divisible"]


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """Return the padding that keeps the spatial size of a stride-1 conv ('same' padding)."""
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round a (width-scaled) channel count up to a multiple of ``divisor``."""
    return int(math.ceil(x / divisor) * divisor)


def init_bn_stats(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics from one forward pass on seeded random input.

    A freshly initialised network in eval mode uses mean 0 and variance 1, under which PyTorch's
    default conv init shrinks activations about threefold per layer: a deep model's eval output
    is then a constant. Taking the statistics of one batch (a cumulative average, momentum None)
    keeps eval-mode activations at unit scale, so that eval-mode comparisons mean something.
    The model's train/eval mode is restored, and the global RNG is not touched.
    """
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return model


class Conv(nn.Module):
    """YOLO's standard convolution: Conv2d(bias=False) -> BatchNorm2d -> activation.

    ``act`` follows YOLO: ``True`` means SiLU, an ``nn.Module`` is used as given, anything else
    means no activation.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        d: int = 1,
        act: bool | nn.Module = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            self.act: nn.Module = nn.SiLU()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ConvBNAct(nn.Sequential):
    """Conv2d(bias=False) -> BatchNorm2d -> activation, with the activation given as a class."""

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 1,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            nn.Conv2d(c1, c2, k, s, autopad(k), bias=False),
            nn.BatchNorm2d(c2),
            act_layer(),
        )


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension ``d`` (YOLO's routing-layer form)."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: one max-pool applied three times, all four maps concatenated.

    Equivalent to SPP with kernels (5, 9, 13) when ``k=5``.
    """

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        y3 = self.m(y2)
        return self.cv2(torch.cat((x, y1, y2, y3), 1))
