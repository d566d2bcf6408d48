"""A small YOLOv5 written the way Ultralytics' YOLOv5 (v7.0) is written.

What fxfusion must survive here is kept faithfully:
- the model is a flat ``nn.Sequential`` built by a ``parse_model`` from a ``[from, number,
  module, args]`` spec, and its forward routes tensors by the integer attributes ``m.f`` and
  ``m.i`` that are set on every layer;
- ``Concat`` takes a list; ``C3`` and ``SPPF`` concatenate inside themselves;
- ``Detect`` unpacks runtime shapes and, in eval mode, rebuilds its grids behind the
  data-dependent check ``self.grid[i].shape[2:4] != x[i].shape[2:4]``;
- ``forward`` takes an ``augment`` flag.
The last two make ``torch.fx.symbolic_trace`` of the whole model fail (train mode fails on
``if augment``, eval mode also on the grid check), while every block traces on its own.

Fusion sites at the default depth multiple 0.33 (20 in all):
- 7 Bottleneck shortcut adds in the backbone C3 layers (layers 2, 4, 6, 8 hold 1, 2, 3, 1);
- 8 C3 internal cats (layers 2, 4, 6, 8, 13, 17, 20, 23);
- 1 SPPF cat (layer 9);
- 4 neck Concat layers (12, 16, 19, 22).
The neck C3 layers use ``shortcut=False``, and ``Detect`` has no site: its cats go straight to
the output.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from fxfusion.zoo.common import SPPF, Concat, Conv, forward_routed, init_bn_stats, parse_yolo

__all__ = [
    "ANCHORS",
    "C3",
    "SPPF",
    "Bottleneck",
    "Concat",
    "Conv",
    "Detect",
    "YOLOv5",
    "parse_model",
    "yolov5_tiny",
]

# YOLOv5's default anchors (P3 10,13 ... P5 373,326 for 640 px images) scaled by 1/5, for
# 64-128 px inputs. Pixels; YOLOv5 divides them by the stride once the strides are known.
ANCHORS: list[list[int]] = [
    [2, 3, 3, 6, 7, 5],  # P3/8
    [6, 12, 12, 9, 12, 24],  # P4/16
    [23, 18, 31, 40, 75, 65],  # P5/32
]

# yolov5s.yaml, unchanged apart from the names being strings resolved through _MODULES.
BACKBONE: list[list[Any]] = [
    [-1, 1, "Conv", [64, 6, 2, 2]],  # 0-P1/2
    [-1, 1, "Conv", [128, 3, 2]],  # 1-P2/4
    [-1, 3, "C3", [128]],  # 2
    [-1, 1, "Conv", [256, 3, 2]],  # 3-P3/8
    [-1, 6, "C3", [256]],  # 4
    [-1, 1, "Conv", [512, 3, 2]],  # 5-P4/16
    [-1, 9, "C3", [512]],  # 6
    [-1, 1, "Conv", [1024, 3, 2]],  # 7-P5/32
    [-1, 3, "C3", [1024]],  # 8
    [-1, 1, "SPPF", [1024, 5]],  # 9
]
HEAD: list[list[Any]] = [
    [-1, 1, "Conv", [512, 1, 1]],  # 10
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 11
    [[-1, 6], 1, "Concat", [1]],  # 12 cat backbone P4
    [-1, 3, "C3", [512, False]],  # 13
    [-1, 1, "Conv", [256, 1, 1]],  # 14
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 15
    [[-1, 4], 1, "Concat", [1]],  # 16 cat backbone P3
    [-1, 3, "C3", [256, False]],  # 17 (P3/8-small)
    [-1, 1, "Conv", [256, 3, 2]],  # 18
    [[-1, 14], 1, "Concat", [1]],  # 19 cat head P4
    [-1, 3, "C3", [512, False]],  # 20 (P4/16-medium)
    [-1, 1, "Conv", [512, 3, 2]],  # 21
    [[-1, 10], 1, "Concat", [1]],  # 22 cat head P5
    [-1, 3, "C3", [1024, False]],  # 23 (P5/32-large)
    [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],  # 24 Detect(P3, P4, P5)
]


class Bottleneck(nn.Module):
    """1x1 conv then 3x3 conv, plus the input when ``shortcut`` and the widths match."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    """CSP bottleneck with three convs: a bottleneck path and a bypass path, concatenated."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class Detect(nn.Module):
    """YOLOv5's anchor-based head: one 1x1 conv per level, ``na`` anchors, ``nc + 5`` outputs each.

    Train mode returns the list of raw maps, each ``(B, na, ny, nx, no)``. Eval mode returns
    ``(torch.cat(z, 1), x)``: ``z[i]`` is level i decoded to ``(B, na*ny*nx, no)`` as
    xy = (2*sigmoid - 0.5 + grid) * stride, wh = (2*sigmoid)**2 * anchor_grid, then objectness
    and class scores sigmoided; ``x`` is the raw list.

    ``stride`` is a plain tensor attribute set by the parent model (as in YOLOv5), and the
    ``anchors`` buffer holds the anchors in units of each level's stride once it is set.
    """

    stride: torch.Tensor | None = None  # set by YOLOv5 after a dummy forward

    def __init__(self, nc: int, anchors: list[list[int]], ch: list[int]) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # x, y, w, h, objectness, classes
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                # YOLOv5's data-dependent check: rebuild the grids when the map size changes.
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + self.grid[i]) * self.stride[i]
                wh = (wh * 2) ** 2 * self.anchor_grid[i]
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * ny * nx, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def _make_grid(self, nx: int, ny: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell offsets (shifted by -0.5) and per-anchor pixel sizes, both (1, na, ny, nx, 2)."""
        device, dtype = self.anchors.device, self.anchors.dtype
        shape = (1, self.na, ny, nx, 2)
        yv, xv = torch.meshgrid(
            torch.arange(ny, device=device, dtype=dtype),
            torch.arange(nx, device=device, dtype=dtype),
            indexing="ij",
        )
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).expand(shape)
        return grid, anchor_grid


_MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPPF": SPPF,
    "Concat": Concat,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
}


def parse_model(spec: dict[str, Any], ch: int) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a YOLOv5 spec and the sorted indices of the outputs to keep."""
    return parse_yolo(spec, ch, _MODULES, scaled=(Conv, Bottleneck, C3, SPPF), repeats=(C3,),
                      named_args={"nc": spec["nc"], "anchors": spec["anchors"]})


class YOLOv5(nn.Module):
    """YOLOv5 detector built from a spec, routing by the ``f``/``i`` attributes of its layers."""

    def __init__(
        self,
        nc: int = 3,
        depth_multiple: float = 0.33,
        width_multiple: float = 0.0625,
        anchors: list[list[int]] | None = None,
        ch: int = 3,
        img_size: int = 64,
    ) -> None:
        super().__init__()
        self.yaml: dict[str, Any] = {
            "nc": nc,
            "depth_multiple": depth_multiple,
            "width_multiple": width_multiple,
            "anchors": copy.deepcopy(anchors if anchors is not None else ANCHORS),
            "backbone": copy.deepcopy(BACKBONE),
            "head": copy.deepcopy(HEAD),
        }
        self.model, self.save = parse_model(copy.deepcopy(self.yaml), ch)
        self.nc = nc
        self.names = [str(i) for i in range(nc)]

        # Strides come from a dummy forward, as in YOLOv5. Fresh BatchNorm statistics are
        # restored afterwards so that building the model has no side effect on them.
        detect = self.model[-1]
        with torch.no_grad():
            maps = self.forward(torch.zeros(1, ch, img_size, img_size))
        detect.stride = torch.tensor([img_size / m.shape[2] for m in maps])
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        detect.anchors /= detect.stride.view(-1, 1, 1)
        self.stride = detect.stride
        self._initialize_biases(img_size)

    def forward(
        self, x: torch.Tensor, augment: bool = False
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor] | None]:
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor) -> Any:
        return forward_routed(self.model, self.save, x)

    def _forward_augment(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Test-time augmentation: the image and its left-right flip, predictions concatenated."""
        if self.training:
            raise ValueError("augment=True needs eval mode (it merges decoded boxes); call .eval()")
        width = x.shape[-1]
        pred = self._forward_once(x)[0]
        pred_flip = self._forward_once(x.flip(-1))[0]
        pred_flip = torch.cat((width - pred_flip[..., :1], pred_flip[..., 1:]), -1)
        return torch.cat((pred, pred_flip), 1), None

    def _initialize_biases(self, img_size: int) -> None:
        """YOLOv5's prior: about 8 objects per image, and 0.6 / nc class probability."""
        detect = self.model[-1]
        with torch.no_grad():
            for conv, s in zip(detect.m, detect.stride, strict=True):
                b = conv.bias.view(detect.na, -1)
                b[:, 4] += math.log(8 / (img_size / s) ** 2)
                b[:, 5 : 5 + detect.nc] += math.log(0.6 / (detect.nc - 0.99))

    def _apply(self, fn: Any, recurse: bool = True) -> YOLOv5:
        # Detect keeps stride and grids as plain attributes (YOLOv5 does), so move them here.
        super()._apply(fn, recurse)
        detect = self.model[-1]
        detect.stride = fn(detect.stride)
        detect.grid = [fn(g) for g in detect.grid]
        detect.anchor_grid = [fn(g) for g in detect.anchor_grid]
        self.stride = detect.stride
        return self


def yolov5_tiny(**kwargs: Any) -> YOLOv5:
    """Tiny YOLOv5s-topology detector (widths 8-64, P3-P5) for 64 px inputs."""
    model = YOLOv5(**kwargs)
    size = kwargs.get("img_size", 64)
    init_bn_stats(model, (8, kwargs.get("ch", 3), size, size))
    return model
