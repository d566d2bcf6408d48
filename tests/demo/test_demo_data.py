"""Tests of fxfusion.demo.data: determinism per index, split separation, target ranges, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxfusion.demo.data import CLASS_NAMES, ShapesDataset, _shape_alpha, collate, make_loader


def test_same_index_gives_identical_items_even_without_cache():
    a = ShapesDataset("train", n=8, img_size=64, seed=3, cache=False)
    b = ShapesDataset("train", n=8, img_size=64, seed=3, cache=False)
    for i in (0, 5, 7):
        img1, tgt1 = a[i]
        img2, tgt2 = a[i]
        img3, tgt3 = b[i]
        assert torch.equal(img1, img2) and torch.equal(img1, img3)
        assert torch.equal(tgt1, tgt2) and torch.equal(tgt1, tgt3)


def test_cached_item_equals_regenerated_item():
    cached = ShapesDataset("val", n=4, img_size=64, cache=True)
    fresh = ShapesDataset("val", n=4, img_size=64, cache=False)
    first = cached[2]
    first[0].zero_()  # a caller mutating its tensors must not corrupt the cache
    first[1].zero_()
    for x, y in zip(cached[2], fresh[2], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("other_split", "other_seed"), [("val", 0), ("train", 1)], ids=["split", "seed"]
)
def test_splits_and_seeds_give_different_images(other_split, other_seed):
    base = ShapesDataset("train", n=6, img_size=64, seed=0)
    other = ShapesDataset(other_split, n=6, img_size=64, seed=other_seed)
    for i in range(6):
        assert not torch.equal(base[i][0], other[i][0])


@pytest.mark.parametrize("num_classes", [1, 3, len(CLASS_NAMES)])
def test_images_and_targets_are_in_range(num_classes):
    ds = ShapesDataset("train", n=40, img_size=96, num_classes=num_classes)
    assert ds.class_names == CLASS_NAMES[:num_classes]
    seen = set()
    for i in range(len(ds)):
        image, targets = ds[i]
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert targets.ndim == 2 and targets.shape[1] == 5 and 1 <= targets.shape[0] <= 4
        cls, cx, cy, w, h = targets.T
        assert torch.equal(cls, cls.round()) and (cls >= 0).all() and (cls < num_classes).all()
        assert (w >= 0.10 * 0.7 - 1e-6).all() and (torch.maximum(w, h) <= 0.45 + 1e-6).all()
        assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
        assert (cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()
        seen.update(int(c) for c in cls)
    assert seen == set(range(num_classes))


@pytest.mark.parametrize("cls", range(len(CLASS_NAMES)), ids=list(CLASS_NAMES))
def test_every_shape_touches_all_four_sides_of_its_box(cls):
    # The targets are only right if each drawn shape spans exactly its box.
    size, (cx, cy, w, h) = 64, (30.0, 33.0, 24.0, 16.0)
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    alpha = _shape_alpha(cls, xx - cx, yy - cy, w / 2, h / 2)
    ys, xs = np.nonzero(alpha > 0.5)
    assert abs(xs.min() - (cx - w / 2)) <= 1 and abs(xs.max() + 1 - (cx + w / 2)) <= 1
    assert abs(ys.min() - (cy - h / 2)) <= 1 and abs(ys.max() + 1 - (cy + h / 2)) <= 1
    assert alpha.max() == 1.0 and alpha.min() == 0.0


def test_collate_adds_batch_index():
    ds = ShapesDataset("train", n=3, img_size=64)
    images, targets = collate([ds[0], ds[1], ds[2]])
    counts = [ds[i][1].shape[0] for i in range(3)]
    assert images.shape == (3, 3, 64, 64)
    assert targets.shape == (sum(counts), 6)
    assert targets[:, 0].tolist() == [float(i) for i, c in enumerate(counts) for _ in range(c)]
    assert torch.equal(targets[: counts[0], 1:], ds[0][1])


def test_make_loader_shuffles_reproducibly():
    ds = ShapesDataset("train", n=12, img_size=32)

    def first_targets(seed):
        return [t for _, t in make_loader(ds, batch_size=4, seed=seed)]

    a, b, c = first_targets(0), first_targets(0), first_targets(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [{"split": "test"}, {"num_classes": 0}, {"num_classes": len(CLASS_NAMES) + 1}, {"img_size": 8}],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}="):
        ShapesDataset(**{"split": "train", "n": 4, **kwargs})


def test_out_of_range_index_raises_index_error():
    ds = ShapesDataset("train", n=2, img_size=32)
    with pytest.raises(IndexError):
        ds[2]
    assert torch.equal(ds[-1][0], ds[1][0])
