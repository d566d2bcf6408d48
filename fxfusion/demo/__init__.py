"""The reusable pieces of the end-to-end demo: data, loss, NMS, mAP, training loop, plots.

The benchmarks import them too, so every experiment scores and trains models the same way.

The demo trains a small YOLOv5-style detector on synthetic shapes, on a CPU, in minutes:

    data.py         ShapesDataset, collate, make_loader   seeded synthetic detection data
    loss.py         YoloLoss                              YOLOv5 box / objectness / class loss
    postprocess.py  non_max_suppression, box_iou          per-class NMS in pure torch
    evaluate.py     evaluate_map                          COCO mAP@0.5 and mAP@0.5:0.95
    train.py        train, TrainHook                      the loop that QAT methods hook into
    plots.py        plot_detections, plot_bars            PNG figures (optional matplotlib)

pycocotools, matplotlib and tqdm are imported only by the functions that need them; they come with
``pip install "fxfusion[demo]"``.
"""

from __future__ import annotations

from fxfusion.demo.data import CLASS_NAMES, ShapesDataset, collate, make_loader
from fxfusion.demo.evaluate import evaluate_map
from fxfusion.demo.loss import YoloLoss, bbox_ciou
from fxfusion.demo.plots import plot_bars, plot_detections
from fxfusion.demo.postprocess import box_iou, non_max_suppression, xywh2xyxy
from fxfusion.demo.train import TrainHook, train

__all__ = [
    "CLASS_NAMES",
    "ShapesDataset",
    "TrainHook",
    "YoloLoss",
    "bbox_ciou",
    "box_iou",
    "collate",
    "evaluate_map",
    "make_loader",
    "non_max_suppression",
    "plot_bars",
    "plot_detections",
    "train",
    "xywh2xyxy",
]
