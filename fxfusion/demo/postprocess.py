"""Turn decoded detector outputs into final boxes, in pure torch (torchvision is not a dependency).

:func:`non_max_suppression` is exact greedy NMS, run for all classes in one pass: each box is
shifted by ``cls · 7680`` pixels before the IoU test, so boxes of different classes never overlap
and never suppress each other (the "offset trick"). At most ``max_candidates`` boxes (the
best-scoring) enter NMS, which bounds the IoU matrix it builds.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["box_iou", "non_max_suppression", "xywh2xyxy"]

_CLASS_OFFSET = 7680.0  # larger than any image side we handle, so class groups never overlap
_NMS_BLOCK = 512  # rows of the IoU matrix computed at once


def xywh2xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Convert center-format boxes (cx, cy, w, h) to corner format (x1, y1, x2, y2).

    Args:
        boxes: (..., 4) tensor.

    Returns:
        A new (..., 4) tensor.

    Example:
        >>> from fxfusion.demo.postprocess import xywh2xyxy
        >>> xywh2xyxy(torch.tensor([[2.0, 2.0, 2.0, 4.0]]))
        tensor([[1., 0., 3., 4.]])
    """
    xy, wh = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), dim=-1)


def box_iou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise IoU of two sets of corner-format (x1, y1, x2, y2) boxes.

    Args:
        box1: (N, 4) boxes.
        box2: (M, 4) boxes.
        eps: keeps the division finite for empty boxes.

    Returns:
        (N, M) tensor of IoUs.

    Example:
        >>> from fxfusion.demo.postprocess import box_iou
        >>> box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]]))  # 1 / 7
        tensor([[0.1429]])
    """
    top_left = torch.maximum(box1[:, None, :2], box2[None, :, :2])
    bottom_right = torch.minimum(box1[:, None, 2:], box2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area1 = (box1[:, 2] - box1[:, 0]) * (box1[:, 3] - box1[:, 1])
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1])
    return inter / (area1[:, None] + area2[None, :] - inter + eps)


def non_max_suppression(
    pred: torch.Tensor | tuple[torch.Tensor, object],
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
    *,
    multi_label: bool = False,
    max_candidates: int = 3000,
) -> list[torch.Tensor]:
    """Per-class greedy NMS over decoded predictions.

    Args:
        pred: (B, N, 5 + nc) decoded predictions, ``[cx, cy, w, h, obj, cls_0 .. cls_nc-1]`` with
            boxes in pixels and sigmoided scores, or the eval-mode ``(pred, raw_list)`` pair.
        conf_thres: drop candidates whose confidence ``obj · cls`` is not above this.
        iou_thres: suppress a box whose IoU with a kept box of the same class is above this.
        max_det: keep at most this many boxes per image.
        multi_label: let one anchor give a box for every class above ``conf_thres``, instead of
            only its best class (slightly higher mAP, more boxes).
        max_candidates: only the top-scoring candidates enter NMS, which bounds its cost.

    Returns:
        One (n, 6) tensor per image, ``[x1, y1, x2, y2, conf, cls]``, sorted by confidence.

    Example:
        Three candidates, 2 classes: the second box overlaps the first and has the same best class,
        so it is suppressed; the third, at the same place but of class 1, is kept.

        >>> from fxfusion.demo.postprocess import non_max_suppression
        >>> pred = torch.tensor([[[10.0, 10, 8, 8, 0.9, 0.9, 0.1],
        ...                       [11.0, 10, 8, 8, 0.8, 0.9, 0.1],
        ...                       [11.0, 10, 8, 8, 0.7, 0.1, 0.9]]])
        >>> non_max_suppression(pred, conf_thres=0.25)
        [tensor([[ 6.0000,  6.0000, 14.0000, 14.0000,  0.8100,  0.0000],
                 [ 7.0000,  6.0000, 15.0000, 14.0000,  0.6300,  1.0000]])]

        On a detector's eval-mode output:

        >>> from fxfusion import zoo
        >>> model = zoo.build("yolov5", nc=3).eval()
        >>> dets = non_max_suppression(model(torch.rand(2, 3, 64, 64)), conf_thres=0.25)
        >>> len(dets), dets[0].shape[1]
        (2, 6)
    """
    if isinstance(pred, tuple):
        pred = pred[0]
    if not isinstance(pred, torch.Tensor) or pred.ndim != 3 or pred.shape[2] < 6:
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(
            f"non_max_suppression got {got}; expected decoded predictions (B, N, 5 + nc), "
            "the first output of the model in eval mode."
        )
    if not 0.0 <= conf_thres <= 1.0 or not 0.0 <= iou_thres <= 1.0:
        raise ValueError(
            f"conf_thres={conf_thres} and iou_thres={iou_thres} must both lie in [0, 1]."
        )
    if max_det < 1:
        raise ValueError(f"max_det={max_det} must be >= 1.")

    out = []
    for x in pred.detach():
        x = x[x[:, 4] > conf_thres]
        scores = x[:, 5:] * x[:, 4:5]
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j, None], j[:, None].to(x.dtype)), dim=1)
        else:
            conf, j = scores.max(dim=1, keepdim=True)
            det = torch.cat((boxes, conf, j.to(x.dtype)), dim=1)[conf[:, 0] > conf_thres]
        if det.shape[0] == 0:
            out.append(det.new_zeros((0, 6)))
            continue
        order = torch.sort(det[:, 4], descending=True, stable=True).indices[:max_candidates]
        det = det[order]
        keep = _greedy_nms(det[:, :4] + det[:, 5:6] * _CLASS_OFFSET, iou_thres, max_det)
        out.append(det[keep])
    return out


def _greedy_nms(boxes: torch.Tensor, iou_thres: float, max_det: int) -> torch.Tensor:
    """Indices of the boxes greedy NMS keeps; ``boxes`` must be sorted by descending score.

    The "IoU above threshold" matrix is computed once, in row blocks to bound memory; the greedy
    scan over it is then a cheap loop on booleans (per-box tensor ops cost more than the IoUs).
    """
    n = boxes.shape[0]
    overlaps = (
        torch.cat(
            [box_iou(boxes[i : i + _NMS_BLOCK], boxes) > iou_thres for i in range(0, n, _NMS_BLOCK)]
        )
        .cpu()
        .numpy()
    )
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) == max_det:
            break
        suppressed |= overlaps[i]
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)
