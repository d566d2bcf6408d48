"""Tests of fxfusion.demo.evaluate: perfect, empty and wrong predictions on a small dataset."""

from __future__ import annotations

import sys

import pytest
import torch

from fxfusion.demo.data import ShapesDataset
from fxfusion.demo.evaluate import evaluate_map
from fxfusion.demo.postprocess import xywh2xyxy


def _oracle(dataset, *, class_shift=0):
    """predict_fn returning each image's ground truth with confidence 1, in dataset order."""
    indices = iter(range(len(dataset)))

    def predict(images):
        out = []
        for _ in range(images.shape[0]):
            targets = dataset[next(indices)][1]
            boxes = xywh2xyxy(targets[:, 1:5]) * images.shape[-1]
            cls = (targets[:, :1] + class_shift) % dataset.num_classes
            out.append(torch.cat((boxes, torch.ones_like(cls), cls), dim=1))
        return out

    return predict


@pytest.fixture(scope="module")
def dataset():
    pytest.importorskip("pycocotools")
    return ShapesDataset("val", n=10, img_size=64, seed=2)


def test_perfect_predictions_score_one(dataset):
    result = evaluate_map(_oracle(dataset), dataset, batch_size=4)
    assert result["map50"] == pytest.approx(1.0)
    assert result["map50_95"] == pytest.approx(1.0)
    assert {k: v for k, v in result.items() if k.startswith("ap50_")} == {
        f"ap50_{name}": pytest.approx(1.0) for name in dataset.class_names
    }


def test_empty_predictions_score_zero(dataset):
    result = evaluate_map(lambda images: [torch.zeros((0, 6))] * images.shape[0], dataset)
    assert result == {
        "map50": 0.0,
        "map50_95": 0.0,
        **dict.fromkeys([f"ap50_{name}" for name in dataset.class_names], 0.0),
    }


def test_right_boxes_with_wrong_classes_score_zero(dataset):
    result = evaluate_map(_oracle(dataset, class_shift=1), dataset, batch_size=4)
    assert result["map50"] == 0.0 and result["map50_95"] == 0.0


def test_wrong_number_of_results_is_refused(dataset):
    with pytest.raises(ValueError, match="one \\(n, 6\\) tensor per image"):
        evaluate_map(lambda images: [], dataset)


def test_missing_pycocotools_names_the_extra(monkeypatch):
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    ds = ShapesDataset("val", n=2, img_size=32)
    with pytest.raises(ImportError, match=r'pip install "fxfusion\[demo\]"'):
        evaluate_map(_oracle(ds), ds)
