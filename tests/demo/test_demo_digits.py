"""Tests of fxfusion.demo.digits: real digit scenes, disjoint digit pools, tight boxes, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from fxfusion.demo.digits import DIGIT_NAMES, DigitScenesDataset, load_digit_images  # noqa: E402


def test_items_are_deterministic_and_in_range():
    a = DigitScenesDataset("train", n=20, img_size=64, seed=1, cache=False)
    b = DigitScenesDataset("train", n=20, img_size=64, seed=1)
    for i in range(20):
        (img_a, t_a), (img_b, t_b) = a[i], b[i]
        assert torch.equal(img_a, img_b) and torch.equal(t_a, t_b)
        assert img_a.shape == (3, 64, 64) and 0.0 <= img_a.min() and img_a.max() <= 1.0
        assert 1 <= t_a.shape[0] <= 4 and t_a.shape[1] == 5
        assert set(t_a[:, 0].long().tolist()) <= set(range(10))
        cx, cy, w, h = t_a[:, 1:].T
        assert (w * 64 >= 3).all() and (h * 64 >= 6).all()  # a legible digit, not a speck
        assert (cx - w / 2 >= 0).all() and (cx + w / 2 <= 1).all() and (cy - h / 2 >= 0).all()
        assert (cy + h / 2 <= 1).all()
    assert a.class_names == DIGIT_NAMES and a.num_classes == 10


def test_train_and_val_use_disjoint_digit_images():
    train = DigitScenesDataset("train", n=1, seed=0)
    val = DigitScenesDataset("val", n=1, seed=0)
    assert set(train.pool.tolist()).isdisjoint(val.pool.tolist())
    assert len(train.pool) + len(val.pool) == len(load_digit_images()[1])
    assert 0.15 < len(val.pool) / (len(train.pool) + len(val.pool)) < 0.25
    assert not np.array_equal(DigitScenesDataset("val", n=1, seed=1).pool, val.pool)  # the seed picks the split


def test_box_encloses_the_pasted_ink():
    ds = DigitScenesDataset("val", n=30, img_size=64, seed=0)
    all_classes = set()
    for i in range(30):
        image, targets = ds[i]
        all_classes |= set(targets[:, 0].long().tolist())
        for _, cx, cy, w, h in targets.tolist():
            x0, x1 = round((cx - w / 2) * 64), round((cx + w / 2) * 64)
            y0, y1 = round((cy - h / 2) * 64), round((cy + h / 2) * 64)
            inside = image[:, y0:y1, x0:x1]
            # the ink differs from the background: the box holds real contrast
            assert float(inside.std(dim=(1, 2)).max()) > 0.05
    assert len(all_classes) >= 8  # many digits appear, not one


def test_small_images_are_refused():
    with pytest.raises(ValueError, match="img_size=16"):
        DigitScenesDataset(img_size=16)


def test_digits_are_the_sklearn_ones():
    images, labels = load_digit_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1
    assert sorted(set(labels.tolist())) == list(range(10))
