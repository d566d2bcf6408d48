"""COCO-style mAP of a detector on a demo dataset, so every model variant is scored the same way.

The ground truth and the detections are built as in-memory COCO json objects and scored by
pycocotools' ``COCOeval`` (101-point interpolated AP, IoU thresholds 0.50:0.05:0.95, at most 100
detections per image). Nothing is written to disk, and pycocotools' progress prints are swallowed.
A detector that finds nothing scores 0.0; COCOeval itself cannot load an empty result list.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fxfusion.demo.data import collate

__all__ = ["evaluate_map"]


def evaluate_map(
    predict_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    dataset: Dataset,
    batch_size: int = 16,
    *,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Score ``predict_fn`` on ``dataset`` with COCO mAP@0.5 and mAP@0.5:0.95.

    Args:
        predict_fn: maps images (B, 3, H, W) to B tensors (n, 6) ``[x1, y1, x2, y2, conf, cls]`` in
            pixels, e.g. the model in eval mode followed by
            :func:`fxfusion.demo.postprocess.non_max_suppression`. It runs under ``torch.no_grad``.
        dataset: items ``(image, targets (n, 5) = [cls, cx, cy, w, h] normalized)``, such as
            :class:`fxfusion.demo.data.ShapesDataset`; read in index order.
        batch_size: images per ``predict_fn`` call.
        progress: show a tqdm bar over the batches.
        desc: label of that bar.

    Returns:
        ``{"map50": ..., "map50_95": ..., "ap50_<class name>": ...}``. A class without ground truth
        gets ``nan``; with no detections at all, every other score is 0.0.

    Raises:
        ValueError: the dataset has no ground-truth box at all, or ``predict_fn`` returns the
            wrong number or shape of results.

    Example:
        An untrained detector, on a few validation images (a trained one scores about 0.7):

        >>> from fxfusion import zoo
        >>> from fxfusion.demo.data import ShapesDataset
        >>> from fxfusion.demo.evaluate import evaluate_map
        >>> from fxfusion.demo.postprocess import non_max_suppression
        >>> model = zoo.build("yolov5", nc=3).eval()
        >>> def predict(images):
        ...     return non_max_suppression(model(images), conf_thres=0.001)
        >>> scores = evaluate_map(predict, ShapesDataset("val", n=8, img_size=64))
        >>> sorted(scores)
        ['ap50_circle', 'ap50_square', 'ap50_triangle', 'map50', 'map50_95']
        >>> 0.0 <= scores["map50_95"] <= scores["map50"] <= 1.0
        True
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    coco_cls, coco_eval_cls = _import_pycocotools()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    with torch.no_grad():
        for batch, targets in _progress(loader, progress, desc):
            preds = predict_fn(batch)
            if len(preds) != batch.shape[0]:
                raise ValueError(
                    f"predict_fn returned {len(preds)} results for a batch of {batch.shape[0]} "
                    "images; it must return one (n, 6) tensor per image."
                )
            height, width = batch.shape[2], batch.shape[3]
            for k, det in enumerate(preds):
                image_id = len(images)
                images.append({"id": image_id, "width": width, "height": height})
                for cls, cx, cy, w, h in targets[targets[:, 0] == k, 1:].double().tolist():
                    x, y, w, h = (cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height
                    annotations.append(
                        {
                            "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                            "image_id": image_id,
                            "category_id": int(cls),
                            "bbox": [x, y, w, h],
                            "area": w * h,
                            "iscrowd": 0,
                        }
                    )
                detections.extend(_detections(det, image_id))

    if not annotations:
        raise ValueError(
            f"the dataset ({type(dataset).__name__}, {len(images)} images) has no ground-truth "
            "boxes, so mAP is undefined; evaluate on images that contain objects."
        )
    names = getattr(dataset, "class_names", None)
    if names is None:
        names = [str(c) for c in range(1 + max(a["category_id"] for a in annotations))]
    gt_classes = {a["category_id"] for a in annotations}
    result = {"map50": 0.0, "map50_95": 0.0}
    result.update(
        {f"ap50_{name}": 0.0 if c in gt_classes else math.nan for c, name in enumerate(names)}
    )
    if not detections:  # COCO.loadRes cannot take an empty list; nothing found scores 0
        return result

    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_cls()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": name} for c, name in enumerate(names)],
        }
        gt.createIndex()
        dt = gt.loadRes(detections)
        coco_eval = coco_eval_cls(gt, dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    result["map50_95"] = max(float(coco_eval.stats[0]), 0.0)
    result["map50"] = max(float(coco_eval.stats[1]), 0.0)
    # precision: [iou_thr, recall, class, area range, max dets]; iou 0.5, all areas, 100 dets.
    precision = coco_eval.eval["precision"][0, :, :, 0, -1]
    for k, c in enumerate(coco_eval.params.catIds):
        if c in gt_classes and c < len(names):
            result[f"ap50_{names[c]}"] = float(precision[:, k].mean())
    return result


def _detections(det: torch.Tensor, image_id: int) -> list[dict[str, Any]]:
    """COCO result records for one image's (n, 6) ``[x1, y1, x2, y2, conf, cls]`` tensor."""
    if det.ndim != 2 or det.shape[1] != 6:
        raise ValueError(
            f"predict_fn returned a tensor of shape {tuple(det.shape)}; each image needs (n, 6) "
            "rows of [x1, y1, x2, y2, conf, cls] in pixels."
        )
    return [
        {
            "image_id": image_id,
            "category_id": int(cls),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": conf,
        }
        for x1, y1, x2, y2, conf, cls in det.detach().double().cpu().tolist()
    ]


def _progress(loader: DataLoader, enabled: bool, desc: str) -> Any:
    """``loader`` wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False)


def _import_pycocotools() -> tuple[type, type]:
    """COCO and COCOeval, or an ImportError that says how to install them."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError(
            'evaluate_map needs pycocotools; install the demo extra: pip install "fxfusion[demo]"'
        ) from e
    return COCO, COCOeval
