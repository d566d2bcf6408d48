"""Blocks shared by the reference models of the zoo.

YOLO-style layers (``Conv``, ``Concat``, ``SPPF``) are written the way the YOLOv5 and YOLOv8 code
bases write them, because fxfusion must handle those exact forms: ``Concat`` takes a *list* of
tensors, and ``Conv`` is Conv2d(bias=False) -> BatchNorm2d -> activation. ``ConvBNAct`` is the
torchvision-style variant with an explicit activation class, used by the classifiers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["SPPF", "Concat", "Conv", "ConvBNAct", "autopad", "forward_routed", "init_bn_stats", "make_divisible",
           "parse_yolo"]


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
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    return bn_stats_from(model, [x])


def bn_stats_from(model: nn.Module, inputs: list) -> nn.Module:
    """Recompute every BatchNorm's running statistics as the cumulative average over ``inputs``, in place.

    Each item of ``inputs`` is one model input (a tensor) or a tuple whose first element is
    (an ``(images, targets)`` batch). The model's train/eval mode and the momenta are restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # None: a cumulative average over the batches
        model.train()
        with torch.no_grad():
            for x in inputs:
                model(x[0] if isinstance(x, (tuple, list)) else x)
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


def parse_yolo(
    spec: Mapping[str, Any],
    ch: int,
    modules: Mapping[str, type[nn.Module]],
    *,
    scaled: Sequence[type[nn.Module]],
    repeats: Sequence[type[nn.Module]],
    named_args: Mapping[str, Any],
) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of an Ultralytics-style YOLO spec and the sorted indices of the outputs to keep.

    ``spec`` holds ``backbone`` + ``head`` rows ``(from, repeats, module name, args)``, the
    ``depth_multiple`` and ``width_multiple`` gains and an optional ``max_channels`` cap. Modules in
    ``scaled`` take ``(c_in, c_out, *args)`` with the width gain on ``c_out``; those in ``repeats``
    repeat their bottlenecks themselves (the depth gain becomes their ``n`` argument). String args
    are looked up in ``named_args`` (``"nc"``, ``"anchors"``).
    """
    gd, gw = spec["depth_multiple"], spec["width_multiple"]
    max_channels = spec.get("max_channels")
    chs = [ch]  # output channels per layer; starts with the input's
    layers: list[nn.Module] = []
    save: list[int] = []
    for i, (f, n, name, args) in enumerate(spec["backbone"] + spec["head"]):
        if name not in modules:
            raise ValueError(f"layer {i}: unknown module {name!r}; known: {sorted(modules)}")
        module = modules[name]
        args = [named_args.get(a, a) if isinstance(a, str) else a for a in args]
        n = max(round(n * gd), 1) if n > 1 else n  # depth gain
        if module in scaled:
            c_out = args[0] if max_channels is None else min(args[0], max_channels)
            c1, c2 = chs[f], make_divisible(c_out * gw, 8)  # width gain
            args = [c1, c2, *args[1:]]
            if module in repeats:
                args.insert(2, n)
                n = 1
        elif module is Concat:
            c2 = sum(chs[j] for j in f)
        elif name == "Detect":
            args.append([chs[j] for j in f])
            c2 = chs[-1]  # unused: Detect is last
        else:
            c2 = chs[f]
        layer = nn.Sequential(*(module(*args) for _ in range(n))) if n > 1 else module(*args)
        # Routing attributes, set on every layer as the YOLO code bases do; the parent's forward reads them.
        layer.i, layer.f = i, f
        layer.type = f"{module.__module__}.{module.__qualname__}"
        layer.np = sum(p.numel() for p in layer.parameters())
        save.extend(j % i for j in ([f] if isinstance(f, int) else f) if j != -1)
        layers.append(layer)
        if i == 0:
            chs = []
        chs.append(c2)
    return nn.Sequential(*layers), sorted(save)


def forward_routed(layers: nn.Sequential, save: Sequence[int], x: Any) -> Any:
    """Run YOLO layers in order, feeding each the outputs its ``f`` names (-1: the previous layer)."""
    y: list[Any] = []  # outputs kept for later layers (None where nobody reads them)
    for m in layers:
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = m(x)
        y.append(x if m.i in save else None)
    return x
