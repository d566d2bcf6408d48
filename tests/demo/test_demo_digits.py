"""Tests of fxfusion.demo.digits: real digits, disjoint pools, tight boxes, labels, size, no overlap, determinism."""

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
        assert 1 <= t_a.shape[0] <= 2 and t_a.shape[1] == 5  # 1 or 2 digits by default
        assert set(t_a[:, 0].long().tolist()) <= set(range(10))
        cx, cy, w, h = t_a[:, 1:].T
        assert (w * 64 >= 5).all() and (h * 64 >= 16).all() and (h * 64 <= 40).all()  # large enough to classify
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


def test_labels_are_the_pasted_digits():
    # The digit drawn in box k is the pool image whose label is targets[k, 0]: re-render one scene's
    # single digit and check its ink correlates best with digits of its own class.
    images, labels = load_digit_images()
    ds = DigitScenesDataset("train", n=40, img_size=64, seed=0)
    hits = total = 0
    for i in range(40):
        image, targets = ds[i]
        gray = 1.0 - image.mean(0).numpy()
        for cls, cx, cy, w, h in targets.tolist():
            x0, x1 = int(round((cx - w / 2) * 64)), int(round((cx + w / 2) * 64))
            y0, y1 = int(round((cy - h / 2) * 64)), int(round((cy + h / 2) * 64))
            crop = torch.nn.functional.interpolate(torch.from_numpy(gray[y0:y1, x0:x1].copy())[None, None],
                                                   size=(8, 8), mode="area")[0, 0].numpy().ravel()
            crop = (crop - crop.mean()) / (crop.std() + 1e-6)
            refs = [images[labels == c].reshape(-1, 64).mean(0) for c in range(10)]
            refs = [(r - r.mean()) / (r.std() + 1e-6) for r in refs]
            hits += int(np.argmax([float(crop @ r) for r in refs]) == int(cls))
            total += 1
    assert hits / total > 0.6  # a nearest-class-mean reader agrees with most labels


def _intersection(a, b):
    iw = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    ih = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    return max(iw, 0.0) * max(ih, 0.0)


@pytest.mark.parametrize("img_size,max_objects", [(64, 2), (96, 4)])
def test_digits_never_overlap_and_max_objects_holds(img_size, max_objects):
    ds = DigitScenesDataset("train", n=60, img_size=img_size, seed=2, max_objects=max_objects, cache=False)
    counts = []
    for i in range(60):
        boxes = ds[i][1][:, 1:].tolist()
        counts.append(len(boxes))
        for j, a in enumerate(boxes):
            for b in boxes[j + 1:]:
                assert _intersection(a, b) < 1e-9  # no digit hides part of another
    assert 1 <= min(counts) and max(counts) <= max_objects
    assert max(counts) >= 2  # scenes with several digits do occur


def test_small_images_still_fit_a_digit():
    ds = DigitScenesDataset("val", n=10, img_size=32, seed=0, cache=False)
    for i in range(10):
        image, targets = ds[i]
        assert image.shape == (3, 32, 32) and targets.shape[0] >= 1
        assert (targets[:, 1:] >= 0).all() and (targets[:, 1:] <= 1).all()


def test_small_images_are_refused():
    with pytest.raises(ValueError, match="img_size=16"):
        DigitScenesDataset(img_size=16)


def test_digits_are_the_sklearn_ones():
    images, labels = load_digit_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1
    assert sorted(set(labels.tolist())) == list(range(10))
