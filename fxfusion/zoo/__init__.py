"""Reference multi-branch models, small and randomly initialised, for tests and demos.

Each entry of ``ZOO`` names a builder, its default input shape (batch included) and the number
of fusion sites that fxfusion should find in it at the default arguments. A fusion site is a
cat, or an add, of two or more activations along the feature axis whose result reaches a conv,
linear or norm layer before any model output (see docs/DESIGN.md, "What a site is"). Each model's module
docstring lists its sites.

Example:
    >>> from fxfusion import zoo
    >>> model = zoo.build("resnet").eval()
    >>> (x,) = zoo.example_inputs("resnet")
    >>> model(x).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxfusion.zoo.densenet import densenet_tiny
from fxfusion.zoo.fpn import fpn_tiny
from fxfusion.zoo.inception import inception_tiny
from fxfusion.zoo.resnet import resnet18_tiny
from fxfusion.zoo.transformer import vit_tiny
from fxfusion.zoo.unet import unet_tiny
from fxfusion.zoo.yolov5 import yolov5_tiny
from fxfusion.zoo.yolov8 import yolov8_tiny

__all__ = ["ZOO", "ZooEntry", "build", "example_inputs"]


@dataclass(frozen=True)
class ZooEntry:
    """A reference model: how to build it, what it eats, and how many fusion sites it holds."""

    name: str
    build: Callable[..., nn.Module]  # called with no arguments for the default model
    input_shape: tuple[int, ...]  # batch included
    expected_sites: int  # at the builder's default arguments
    description: str


ZOO: dict[str, ZooEntry] = {
    "yolov5": ZooEntry(
        "yolov5",
        yolov5_tiny,
        (2, 3, 64, 64),
        # 7 backbone Bottleneck adds (C3 layers 2/4/6/8 hold 1+2+3+1) + 8 C3 internal cats
        # (layers 2, 4, 6, 8, 13, 17, 20, 23) + 1 SPPF cat (9) + 4 neck Concats (12, 16, 19, 22).
        20,
        "YOLOv5s topology, anchor-based Detect, parse_model routing by m.f/m.i",
    ),
    "yolov8": ZooEntry(
        "yolov8",
        yolov8_tiny,
        (2, 3, 64, 64),
        # 8 C2f cats + 6 Bottleneck adds inside the backbone C2f layers (2/4/6/8 hold 1+2+2+1)
        # + 1 SPPF cat (9) + 4 neck Concats (11, 14, 17, 20). Detect cats are outputs.
        19,
        "YOLOv8 topology, C2f (chunk iterated), anchor-free Detect, routing by m.f/m.i",
    ),
    "unet": ZooEntry(
        "unet",
        unet_tiny,
        (2, 3, 64, 64),
        3,  # skip cats in up3, up2, up1
        "depth-3 U-Net, skip connections by torch.cat([up, skip], 1)",
    ),
    "resnet": ZooEntry(
        "resnet",
        resnet18_tiny,
        (2, 3, 64, 64),
        8,  # out += identity in each of the 2+2+2+2 BasicBlocks (the last one feeds fc)
        "ResNet-18 topology at widths 8-64, residual adds",
    ),
    "densenet": ZooEntry(
        "densenet",
        densenet_tiny,
        (2, 3, 64, 64),
        6,  # torch.cat([x, new], 1) in each of the 3+3 dense layers
        "DenseNet-BC, two dense blocks of 3 layers, concatenation growth",
    ),
    "inception": ZooEntry(
        "inception",
        inception_tiny,
        (2, 3, 64, 64),
        2,  # the 4-way branch cat of inception3a and of inception3b
        "GoogLeNet-style stem and two 4-branch Inception blocks",
    ),
    "fpn": ZooEntry(
        "fpn",
        fpn_tiny,
        (2, 3, 64, 64),
        3,  # top-down adds lateral_i(c_i) + upsample(p_{i+1}) for P4, P3, P2
        "conv backbone + 4-level FPN with top-down adds",
    ),
    "transformer": ZooEntry(
        "transformer",
        vit_tiny,
        (2, 3, 64, 64),
        4,  # attention and MLP residual adds of 2 pre-norm blocks (feature axis -1)
        "ViT encoder, hand-written attention, class token and position embedding",
    ),
}


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the zoo model ``name``, passing ``kwargs`` to its builder.

    Args:
        name: a key of ``ZOO``.
        **kwargs: builder arguments (e.g. ``nc=5`` for the YOLO models). ``expected_sites``
            holds for the defaults only.

    Returns:
        A freshly initialised model in train mode. Its BatchNorm running statistics are taken
        from one seeded random batch (``common.init_bn_stats``), so eval mode is meaningful.

    Example:
        >>> model = build("unet", num_classes=3)
    """
    entry = _entry(name)
    return entry.build(**kwargs)


def example_inputs(name: str, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Return reproducible random inputs for ``name`` at its default shape with batch ``batch``.

    Args:
        name: a key of ``ZOO``.
        batch: the batch size, replacing the one in ``input_shape``.
        seed: seed of the generator that draws the standard-normal inputs.

    Returns:
        The positional inputs of the model's forward, as a tuple.

    Example:
        >>> (x,) = example_inputs("yolov5", batch=1)
        >>> tuple(x.shape)
        (1, 3, 64, 64)
    """
    entry = _entry(name)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, *entry.input_shape[1:])
    return (torch.randn(shape, generator=generator),)


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}")
    return ZOO[name]
