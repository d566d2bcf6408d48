"""Tests of fxfusion.demo.postprocess against hand-computed boxes and IoUs."""

from __future__ import annotations

import pytest
import torch

from fxfusion.demo.postprocess import box_iou, non_max_suppression, xywh2xyxy


def _pred(rows):
    """(1, N, 5 + 2) predictions from rows (cx, cy, w, h, obj, cls0, cls1)."""
    return torch.tensor([rows], dtype=torch.float32)


def test_xywh2xyxy():
    out = xywh2xyxy(torch.tensor([[2.0, 2.0, 2.0, 4.0], [10.0, 20.0, 6.0, 8.0]]))
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 3.0, 4.0], [7.0, 16.0, 13.0, 24.0]]))


def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    expected = torch.tensor([[1 / 7, 1.0, 0.0], [4 / 16, 4 / 16, 0.0]])
    assert torch.allclose(box_iou(a, b), expected, atol=1e-6)


def test_overlapping_boxes_of_one_class_keep_the_best():
    # Boxes x 5..15 and 6..16, same rows: IoU = 90 / 110 = 0.82 > 0.6.
    pred = _pred([[10, 10, 10, 10, 0.8, 1.0, 0.0], [11, 10, 10, 10, 0.9, 1.0, 0.0]])
    (det,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.6)
    assert torch.allclose(det, torch.tensor([[6.0, 5.0, 16.0, 15.0, 0.9, 0.0]]))


def test_overlapping_boxes_of_different_classes_are_both_kept():
    pred = _pred([[10, 10, 10, 10, 0.8, 0.9, 0.1], [11, 10, 10, 10, 0.9, 0.2, 0.9]])
    (det,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.6)
    expected = torch.tensor([[6.0, 5.0, 16.0, 15.0, 0.81, 1.0], [5.0, 5.0, 15.0, 15.0, 0.72, 0.0]])
    assert det.shape == (2, 6)
    assert torch.allclose(det, expected)


def test_boxes_below_iou_threshold_are_both_kept():
    # x 5..15 and 12..22: IoU = 30 / 170, far below 0.6; nothing should be suppressed.
    pred = _pred([[10, 10, 10, 10, 0.9, 1.0, 0.0], [17, 10, 10, 10, 0.8, 1.0, 0.0]])
    (det,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.6)
    assert det[:, 4].tolist() == pytest.approx([0.9, 0.8])


def test_confidence_is_obj_times_class_and_filters():
    pred = _pred([[10, 10, 4, 4, 0.5, 0.4, 0.1], [40, 40, 4, 4, 0.9, 0.9, 0.0]])
    (det,) = non_max_suppression(pred, conf_thres=0.25)
    assert det[:, 4].tolist() == pytest.approx([0.81])


def test_multi_label_gives_one_box_per_class_above_threshold():
    pred = _pred([[10, 10, 4, 4, 1.0, 0.9, 0.5]])
    (det,) = non_max_suppression(pred, conf_thres=0.25, multi_label=True)
    assert det[:, 5].tolist() == [0.0, 1.0]


def test_max_det_and_batches():
    rows = [[10 * i + 5, 5, 4, 4, 1.0 - 0.01 * i, 1.0, 0.0] for i in range(8)]
    pred = torch.tensor([rows, rows[:1] + [[0, 0, 1, 1, 0.0, 0.0, 0.0]] * 7])
    first, second = non_max_suppression(pred, conf_thres=0.25, max_det=3)
    assert first.shape == (3, 6) and first[:, 4].tolist() == pytest.approx([1.0, 0.99, 0.98])
    assert second.shape == (1, 6)


def test_nothing_above_threshold_gives_empty_result():
    pred = _pred([[10, 10, 4, 4, 0.01, 0.5, 0.5]])
    (det,) = non_max_suppression(pred, conf_thres=0.25)
    assert det.shape == (0, 6)


def test_eval_mode_pair_is_accepted():
    pred = _pred([[10, 10, 10, 10, 0.9, 1.0, 0.0]])
    (det,) = non_max_suppression((pred, [torch.zeros(1)]), conf_thres=0.25)
    assert det.shape == (1, 6)


@pytest.mark.parametrize(
    ("pred", "kwargs"),
    [(torch.zeros(1, 3, 4, 4, 7), {}), (torch.zeros(1, 2, 7), {"iou_thres": 1.5})],
    ids=["raw-level-output", "bad-threshold"],
)
def test_bad_input_raises_value_error(pred, kwargs):
    with pytest.raises(ValueError):
        non_max_suppression(pred, **kwargs)
