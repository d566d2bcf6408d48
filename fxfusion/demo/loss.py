"""The YOLOv5 training loss, so the demo detector trains with the objective its head was built for.

The head predicts, per level i, anchor a and grid cell (j, k), raw values
(tx, ty, tw, th, to, tc...) that decode as (YOLOv5 v6 parameterisation, sizes in grid units):

    bx = 2·σ(tx) − 0.5 + k          bw = (2·σ(tw))² · anchor_w
    by = 2·σ(ty) − 0.5 + j          bh = (2·σ(th))² · anchor_h

Target assignment:
- a ground-truth box goes to every anchor whose width and height ratios r = gt/anchor satisfy
  max(r, 1/r) < ``anchor_t`` (4.0);
- besides the cell holding its centre, it also goes to the two neighbour cells nearest to the centre
  (offset g = 0.5), which is why the xy decode spans −0.5..1.5.

Loss, summed over levels:
- box: mean of (1 − CIoU) over assigned predictions;
- objectness: BCE over every cell, with target max(CIoU, 0) at assigned cells and 0 elsewhere,
  weighted per level by ``balance`` (4.0, 1.0, 0.4 for P3–P5: small-object levels count more);
- class: BCE against a one-hot target at assigned cells (skipped for a single class).

The three parts are weighted by ``box_gain`` / ``obj_gain`` / ``cls_gain`` times 3/nl, and the total
is multiplied by the batch size, as YOLOv5 does. YOLOv5 also scales the class gain by nc/80 and the
objectness gain by (img_size/640)²; those tune COCO at 640 px and are left out here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["YoloLoss", "bbox_ciou"]

_HEAD_ATTRS = ("nc", "nl", "na", "anchors", "stride")
# Where a target also claims a neighbour cell: itself, then left, up, right, down (times g).
_NEIGHBOURS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


class YoloLoss:
    """YOLOv5-style detection loss for a model whose last module is a Detect head.

    Args:
        model: the detector; its head is ``model.model[-1]`` or, failing that, the last submodule
            with ``nc``, ``nl``, ``na``, ``anchors`` and ``stride``. Anchors are read once, here.
        box_gain: weight of the CIoU box loss (before the 3/nl scaling).
        obj_gain: weight of the objectness loss.
        cls_gain: weight of the class loss.
        anchor_t: largest allowed width/height ratio between a target and an anchor.
        balance: objectness weight per level; defaults to YOLOv5's (4.0, 1.0, 0.4) for 3 levels.
        label_smoothing: class label smoothing epsilon.

    Calling ``loss(outputs, targets)`` takes the train-mode outputs (a list of nl tensors
    (B, na, ny, nx, no)) or the eval-mode ``(pred, raw_list)`` pair, and targets (M, 6)
    ``[batch_idx, cls, cx, cy, w, h]`` normalized to 0..1. It returns
    ``(total * batch_size, tensor([box, obj, cls]))``; the items are detached.

    Example:
        >>> from fxfusion import zoo
        >>> from fxfusion.demo.data import ShapesDataset, collate
        >>> from fxfusion.demo.loss import YoloLoss
        >>> model = zoo.build("yolov5", nc=3)
        >>> ds = ShapesDataset("train", n=2, img_size=64)
        >>> images, targets = collate([ds[0], ds[1]])
        >>> loss_fn = YoloLoss(model)
        >>> loss, items = loss_fn(model(images), targets)
        >>> loss.backward()
        >>> loss.shape, items.shape  # the total, and its (box, obj, cls) parts
        (torch.Size([]), torch.Size([3]))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        box_gain: float = 0.05,
        obj_gain: float = 1.0,
        cls_gain: float = 0.5,
        anchor_t: float = 4.0,
        balance: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        head = _find_head(model)
        self.nc, self.nl, self.na = int(head.nc), int(head.nl), int(head.na)
        anchors = torch.as_tensor(head.anchors).detach().clone().float()
        if anchors.shape != (self.nl, self.na, 2):
            raise ValueError(
                f"{type(head).__name__}.anchors has shape {tuple(anchors.shape)}; YoloLoss expects "
                f"(nl, na, 2) = ({self.nl}, {self.na}, 2) in units of the level stride."
            )
        self.anchors = anchors
        if balance is None:
            balance = (4.0, 1.0, 0.4) if self.nl == 3 else (4.0, 1.0, 0.25, 0.06, 0.02)[: self.nl]
        if len(balance) != self.nl:
            raise ValueError(f"balance={tuple(balance)} needs one weight per level ({self.nl}).")
        if anchor_t <= 1.0:
            raise ValueError(f"anchor_t={anchor_t} must be > 1 (YOLOv5 uses 4.0).")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1).")
        self.balance = [float(b) for b in balance]
        self.anchor_t = float(anchor_t)
        self.box_gain = box_gain * 3.0 / self.nl
        self.obj_gain = obj_gain * 3.0 / self.nl
        self.cls_gain = cls_gain * 3.0 / self.nl
        self.cls_pos = 1.0 - 0.5 * label_smoothing
        self.cls_neg = 0.5 * label_smoothing

    def __call__(
        self,
        outputs: Sequence[torch.Tensor] | tuple[torch.Tensor, Sequence[torch.Tensor]],
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raw = _raw_outputs(outputs, self.nl, self.na, self.nc)
        device, dtype = raw[0].device, raw[0].dtype
        targets = targets.to(device=device, dtype=dtype)
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(
                f"targets has shape {tuple(targets.shape)}; expected (M, 6) rows of "
                "[batch_idx, cls, cx, cy, w, h], as returned by fxfusion.demo.collate."
            )
        if (
            targets.shape[0]
            and not 0 <= int(targets[:, 1].min()) <= int(targets[:, 1].max()) < self.nc
        ):
            raise ValueError(
                f"targets hold classes {int(targets[:, 1].min())}..{int(targets[:, 1].max())}, "
                f"but the model's head has nc={self.nc}; build the dataset with "
                f"num_classes={self.nc} or the model with the dataset's class count."
            )
        lbox = torch.zeros((), device=device, dtype=dtype)
        lobj = torch.zeros((), device=device, dtype=dtype)
        lcls = torch.zeros((), device=device, dtype=dtype)
        for level, p in enumerate(raw):
            b, a, gj, gi, tbox, tcls, anchors = self._assign(level, p, targets)
            tobj = torch.zeros(p.shape[:4], device=device, dtype=dtype)
            if b.numel():
                ps = p[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2.0 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2.0) ** 2 * anchors
                ciou = bbox_ciou(torch.cat((pxy, pwh), 1), tbox)
                lbox = lbox + (1.0 - ciou).mean()
                tobj[b, a, gj, gi] = ciou.detach().clamp(min=0.0).to(dtype)
                if self.nc > 1:
                    tc = torch.full_like(ps[:, 5:], self.cls_neg)
                    tc[torch.arange(b.numel(), device=device), tcls] = self.cls_pos
                    lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tc)
            lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4], tobj) * self.balance[level]
        lbox, lobj, lcls = lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain
        batch_size = raw[0].shape[0]
        total = (lbox + lobj + lcls) * batch_size
        return total, torch.stack((lbox, lobj, lcls)).detach()

    def _assign(
        self, level: int, p: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Targets of one level: (b, a, gj, gi) indices, box (xy in cell, wh), class, anchor wh."""
        g = 0.5
        device, dtype = p.device, p.dtype
        ny, nx = p.shape[2], p.shape[3]
        anchors = self.anchors[level].to(device=device, dtype=dtype)
        scale = torch.tensor([nx, ny, nx, ny], device=device, dtype=dtype)
        # (na, M, 7): every target once per anchor, in grid units, with the anchor index appended.
        anchor_idx = torch.arange(self.na, device=device, dtype=dtype).view(-1, 1, 1)
        t = torch.cat(
            (
                targets[None, :, :2].expand(self.na, -1, -1),
                (targets[:, 2:6] * scale)[None].expand(self.na, -1, -1),
                anchor_idx.expand(-1, targets.shape[0], 1),
            ),
            dim=2,
        )
        ratio = t[..., 4:6] / anchors[:, None]
        t = t[torch.maximum(ratio, 1.0 / ratio).amax(2) < self.anchor_t]  # (k, 7)
        gxy = t[:, 2:4]
        gxy_inv = scale[:2] - gxy
        near_lo = (gxy % 1.0 < g) & (gxy > 1.0)  # left / upper neighbour, inside the grid
        near_hi = (gxy_inv % 1.0 < g) & (gxy_inv > 1.0)  # right / lower neighbour
        use = torch.stack(
            (
                torch.ones_like(near_lo[:, 0]),
                near_lo[:, 0],
                near_lo[:, 1],
                near_hi[:, 0],
                near_hi[:, 1],
            )
        )  # (5, k)
        offsets = (_NEIGHBOURS.to(device=device, dtype=dtype) * g)[:, None].expand(
            -1, t.shape[0], -1
        )
        t = t[None].expand(5, -1, -1)[use]
        offsets = offsets[use]
        gxy, gwh = t[:, 2:4], t[:, 4:6]
        cell = (gxy - offsets).long()
        gi = cell[:, 0].clamp(0, nx - 1)
        gj = cell[:, 1].clamp(0, ny - 1)
        tbox = torch.cat((gxy - torch.stack((gi, gj), 1).to(dtype), gwh), 1)
        a = t[:, 6].long()
        return t[:, 0].long(), a, gj, gi, tbox, t[:, 1].long(), anchors[a]


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of matching rows of two (n, 4) center-format (cx, cy, w, h) box sets.

    CIoU = IoU − ρ²/c² − α·v, where ρ is the distance between centres, c the diagonal of
    the smallest enclosing box, v = 4/π²·(atan(w₂/h₂) − atan(w₁/h₁))² the aspect mismatch,
    and α = v / (1 − IoU + v), held constant in the backward pass (as in the CIoU paper).

    Args:
        box1: (n, 4) boxes.
        box2: (n, 4) boxes, compared row by row with ``box1``.
        eps: guards the divisions.

    Returns:
        (n,) CIoU values in [−1.5, 1]; 1 for identical boxes.

    Example:
        Identical boxes, then a box shifted by half its width (IoU 1/3, minus ρ²/c² = 1/13):

        >>> from fxfusion.demo.loss import bbox_ciou
        >>> bbox_ciou(torch.tensor([[1.0, 1, 2, 2], [1.0, 1, 2, 2]]), torch.tensor([[1.0, 1, 2, 2], [2.0, 1, 2, 2]]))
        tensor([1.0000, 0.2564])
    """
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    h1, h2 = h1 + eps, h2 + eps
    inter_w = (
        torch.minimum(x1 + w1 / 2, x2 + w2 / 2) - torch.maximum(x1 - w1 / 2, x2 - w2 / 2)
    ).clamp(0)
    inter_h = (
        torch.minimum(y1 + h1 / 2, y2 + h2 / 2) - torch.maximum(y1 - h1 / 2, y2 - h2 / 2)
    ).clamp(0)
    inter = inter_w * inter_h
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(x1 + w1 / 2, x2 + w2 / 2) - torch.minimum(x1 - w1 / 2, x2 - w2 / 2)
    ch = torch.maximum(y1 + h1 / 2, y2 + h2 / 2) - torch.minimum(y1 - h1 / 2, y2 - h2 / 2)
    c2 = cw**2 + ch**2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def _find_head(model: nn.Module) -> nn.Module:
    """The Detect head: ``model.model[-1]`` if it is one, else the last module that looks like
    one."""
    layers = getattr(model, "model", None)
    if (
        isinstance(layers, (nn.Sequential, nn.ModuleList))
        and len(layers)
        and all(hasattr(layers[-1], attr) for attr in _HEAD_ATTRS)
    ):
        return layers[-1]
    for module in reversed(list(model.modules())):
        if all(hasattr(module, attr) for attr in _HEAD_ATTRS):
            return module
    raise ValueError(
        f"{type(model).__name__} has no YOLOv5-style Detect head: YoloLoss looks for "
        f"model.model[-1], then any submodule, with the attributes {_HEAD_ATTRS}. Pass a "
        "detector from "
        "fxfusion.zoo or add those attributes to its head."
    )


def _raw_outputs(
    outputs: Sequence[torch.Tensor] | tuple[torch.Tensor, Sequence[torch.Tensor]],
    nl: int,
    na: int,
    nc: int,
) -> list[torch.Tensor]:
    """The per-level raw tensors, from train-mode outputs or an eval-mode (pred, raw) pair."""
    is_eval_pair = (
        isinstance(outputs, tuple)
        and len(outputs) == 2
        and isinstance(outputs[0], torch.Tensor)
        and outputs[0].ndim == 3
    )
    if is_eval_pair:  # (decoded pred, raw list)
        outputs = outputs[1]
    raw = list(outputs)
    shapes = [tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in raw]
    if len(raw) != nl or any(
        not isinstance(p, torch.Tensor) or p.ndim != 5 or p.shape[1] != na or p.shape[4] != nc + 5
        for p in raw
    ):
        raise ValueError(
            f"YoloLoss got outputs {shapes}; expected {nl} tensors (B, {na}, ny, nx, {nc + 5}) "
            "from the model in train mode, or its eval-mode (pred, raw_list) pair."
        )
    return raw
