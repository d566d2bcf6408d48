"""A small YOLOv8 written the way Ultralytics' YOLOv8 is written.

Kept faithfully, because fxfusion must survive it:
- the same spec-built ``nn.Sequential`` routed by the integer attributes ``m.f`` and ``m.i`` as
  in YOLOv5;
- ``C2f`` builds a Python list from ``chunk`` and extends it: ``torch.fx`` alone cannot iterate a
  proxy ("Proxy object cannot be iterated"); fxfusion's tracer iterates a ``chunk`` into a constant
  number of pieces;
- the anchor-free ``Detect`` compares a runtime shape with one stored on ``self`` in eval mode
  (``if self.shape != shape``) before rebuilding its anchor points.
Bottleneck, SPPF and Concat trace on their own.

Decoding is DFL-free: the box branch predicts four distances (left, top, right, bottom) from
the anchor point, in units of the level's stride.

Fusion sites at the default depth multiple 0.33 (19 in all):
- 8 C2f cats (layers 2, 4, 6, 8, 12, 15, 18, 21) of the chunk halves and every bottleneck output;
- 6 Bottleneck shortcut adds inside the backbone C2f layers (layers 2, 4, 6, 8 hold 1, 2, 2, 1);
- 1 SPPF cat (layer 9);
- 4 neck Concat layers (11, 14, 17, 20).
Not counted: the neck C2f layers' adds (``shortcut=False``: there are none), and the Detect cats,
which go straight to the output (Detect assigns into its input list, so torch.fx cannot trace it;
it is reported as untraceable with that reason).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from fxfusion.zoo.common import SPPF, Concat, Conv, forward_routed, init_bn_stats, parse_yolo

__all__ = [
    "SPPF",
    "Bottleneck",
    "C2f",
    "Concat",
    "Conv",
    "Detect",
    "YOLOv8",
    "make_anchors",
    "parse_model",
    "yolov8_tiny",
]

# yolov8.yaml, unchanged apart from the names being strings resolved through _MODULES.
BACKBONE: list[list[Any]] = [
    [-1, 1, "Conv", [64, 3, 2]],  # 0-P1/2
    [-1, 1, "Conv", [128, 3, 2]],  # 1-P2/4
    [-1, 3, "C2f", [128, True]],  # 2
    [-1, 1, "Conv", [256, 3, 2]],  # 3-P3/8
    [-1, 6, "C2f", [256, True]],  # 4
    [-1, 1, "Conv", [512, 3, 2]],  # 5-P4/16
    [-1, 6, "C2f", [512, True]],  # 6
    [-1, 1, "Conv", [1024, 3, 2]],  # 7-P5/32
    [-1, 3, "C2f", [1024, True]],  # 8
    [-1, 1, "SPPF", [1024, 5]],  # 9
]
HEAD: list[list[Any]] = [
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 10
    [[-1, 6], 1, "Concat", [1]],  # 11 cat backbone P4
    [-1, 3, "C2f", [512]],  # 12
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 13
    [[-1, 4], 1, "Concat", [1]],  # 14 cat backbone P3
    [-1, 3, "C2f", [256]],  # 15 (P3/8-small)
    [-1, 1, "Conv", [256, 3, 2]],  # 16
    [[-1, 12], 1, "Concat", [1]],  # 17 cat head P4
    [-1, 3, "C2f", [512]],  # 18 (P4/16-medium)
    [-1, 1, "Conv", [512, 3, 2]],  # 19
    [[-1, 9], 1, "Concat", [1]],  # 20 cat head P5
    [-1, 3, "C2f", [1024]],  # 21 (P5/32-large)
    [[15, 18, 21], 1, "Detect", ["nc"]],  # 22 Detect(P3, P4, P5)
]


class Bottleneck(nn.Module):
    """Two convs (3x3 by default), plus the input when ``shortcut`` and the widths match."""

    def __init__(
        self,
        c1: int,
        c2: int,
        shortcut: bool = True,
        g: int = 1,
        k: tuple[int, int] = (3, 3),
        e: float = 0.5,
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP bottleneck with two convs: split, chain bottlenecks, concatenate every partial output."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Iterating the chunk result is what torch.fx cannot trace (as in Ultralytics).
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def make_anchors(
    feats: list[torch.Tensor], strides: torch.Tensor, offset: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre points (A, 2) in grid units and their strides (A, 1), level after level."""
    points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for feat, stride in zip(feats, strides, strict=True):
        h, w = feat.shape[2], feat.shape[3]
        sy = torch.arange(h, device=device, dtype=dtype) + offset
        sx = torch.arange(w, device=device, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), float(stride), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_tensor)


class Detect(nn.Module):
    """YOLOv8's anchor-free head: per level a box branch ``cv2`` and a class branch ``cv3``.

    Train mode returns the list of raw maps ``torch.cat((cv2[i](x[i]), cv3[i](x[i])), 1)``, each
    ``(B, 4 + nc, ny, nx)``. Eval mode returns ``(y, x)``: ``y`` is ``(B, 4 + nc, A)`` with
    A = sum of ny*nx, rows 0-3 the box as (cx, cy, w, h) in pixels and the rest sigmoided class
    scores; ``x`` is the raw list.
    """

    shape: torch.Size | None = None  # input shape the anchors were last built for
    anchors = torch.empty(0)
    strides = torch.empty(0)

    def __init__(self, nc: int, ch: list[int]) -> None:
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.no = nc + 4  # DFL-free: four box distances
        self.stride = torch.zeros(self.nl)  # set by YOLOv8 after a dummy forward
        c2, c3 = max(16, ch[0] // 4, 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4, 1)) for c in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in ch)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        shape = x[0].shape  # B, C, H, W
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        if self.training:
            return x
        # Ultralytics' data-dependent check: rebuild the anchor points when the input size changes.
        if self.shape != shape:
            self.anchors, self.strides = (t.transpose(0, 1) for t in make_anchors(x, self.stride))
            self.shape = shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        box, cls = x_cat.split((4, self.nc), 1)
        lt, rb = box.chunk(2, 1)
        points = self.anchors.unsqueeze(0)
        x1y1, x2y2 = points - lt, points + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1), x

    def bias_init(self, img_size: int) -> None:
        """Ultralytics' prior: box distances start at 1, about 5 objects per image over nc."""
        with torch.no_grad():
            for a, b, s in zip(self.cv2, self.cv3, self.stride, strict=True):
                a[-1].bias.fill_(1.0)
                b[-1].bias.fill_(math.log(5 / self.nc / (img_size / s) ** 2))


_MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C2f": C2f,
    "SPPF": SPPF,
    "Concat": Concat,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
}


def parse_model(spec: dict[str, Any], ch: int) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a YOLOv8 spec and the sorted indices of the outputs to keep."""
    return parse_yolo(spec, ch, _MODULES, scaled=(Conv, Bottleneck, C2f, SPPF), repeats=(C2f,),
                      named_args={"nc": spec["nc"]})


class YOLOv8(nn.Module):
    """YOLOv8 detector built from a spec, routing by the ``f``/``i`` attributes of its layers."""

    def __init__(
        self,
        nc: int = 3,
        depth_multiple: float = 0.33,
        width_multiple: float = 0.0625,
        max_channels: int = 1024,
        ch: int = 3,
        img_size: int = 64,
    ) -> None:
        super().__init__()
        self.yaml: dict[str, Any] = {
            "nc": nc,
            "depth_multiple": depth_multiple,
            "width_multiple": width_multiple,
            "max_channels": max_channels,
            "backbone": copy.deepcopy(BACKBONE),
            "head": copy.deepcopy(HEAD),
        }
        self.model, self.save = parse_model(copy.deepcopy(self.yaml), ch)
        self.nc = nc
        self.names = {i: str(i) for i in range(nc)}

        # Strides come from a dummy forward, as in Ultralytics. Fresh BatchNorm statistics are
        # restored afterwards so that building the model has no side effect on them.
        detect = self.model[-1]
        with torch.no_grad():
            maps = self.forward(torch.zeros(1, ch, img_size, img_size))
        detect.stride = torch.tensor([img_size / m.shape[-2] for m in maps])
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        self.stride = detect.stride
        detect.bias_init(img_size)

    def forward(self, x: torch.Tensor) -> Any:
        return forward_routed(self.model, self.save, x)

    def _apply(self, fn: Any, recurse: bool = True) -> YOLOv8:
        # Detect keeps stride and anchor points as plain attributes (Ultralytics does), so move
        # them here.
        super()._apply(fn, recurse)
        detect = self.model[-1]
        detect.stride = fn(detect.stride)
        detect.anchors = fn(detect.anchors)
        detect.strides = fn(detect.strides)
        self.stride = detect.stride
        return self


def yolov8_tiny(**kwargs: Any) -> YOLOv8:
    """Tiny YOLOv8-topology detector (widths 8-64, P3-P5) for 64 px inputs."""
    model = YOLOv8(**kwargs)
    size = kwargs.get("img_size", 64)
    init_bn_stats(model, (8, kwargs.get("ch", 3), size, size))
    return model
