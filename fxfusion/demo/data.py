"""A synthetic detection dataset, so the demo trains a detector without downloading anything.

Each image holds 1 to 4 filled shapes (circle, square, triangle, ...) of random size, aspect and
colour, on a textured background: a colour gradient, low-frequency blotches, stripes and pixel
noise. The texture keeps the task from being solvable by colour thresholding, so the detector has
to learn shapes, and quantization error in its features shows up in the mAP.

Every image is a pure function of ``(seed, split, index)``: the same index always gives the same
pixels and boxes, and the train and val splits draw from different random streams. Drawing is
vectorised numpy over the whole pixel grid, one shape at a time, with an anti-aliased edge taken
from each shape's signed distance. Generated images are cached in memory as uint8 (27 kB per 96 px
image), so later epochs cost only the uint8 -> float conversion.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["CLASS_NAMES", "ShapesDataset", "collate", "make_loader", "write_yolo_dataset"]

#: Every shape the generator can draw; a dataset with ``num_classes=k`` uses the first k.
CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring", "cross")

_SPLITS = {"train": 0, "val": 1}
_SIZE_RANGE = (0.10, 0.45)  # longer box side, as a fraction of the image side
_MAX_OVERLAP = 0.25  # intersection / smaller box area allowed between two objects
_PLACEMENT_TRIES = 20


class ShapesDataset(Dataset):
    """Seeded synthetic multi-object detection data, generated on the fly.

    Args:
        split: ``"train"`` or ``"val"``; the two splits use different random streams.
        n: number of images.
        img_size: side of the square images, in pixels.
        seed: base seed; together with split and index it fixes every image.
        num_classes: how many shape classes to use, 1 to ``len(CLASS_NAMES)``.
        max_objects: at most this many objects per image (at least one is always drawn).
        cache: keep generated images in memory (as uint8) after their first access.

    ``dataset[i]`` returns ``(image, targets)``: a float tensor (3, H, W) in [0, 1], and a float
    tensor (n_obj, 5) of ``[cls, cx, cy, w, h]`` normalized to 0..1.

    Example:
        >>> from fxfusion.demo.data import ShapesDataset
        >>> ds = ShapesDataset("train", n=4, img_size=96)
        >>> image, targets = ds[0]
        >>> image.shape, targets.shape[1]
        (torch.Size([3, 96, 96]), 5)
        >>> ds.class_names
        ('circle', 'square', 'triangle')
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 1000,
        img_size: int = 96,
        seed: int = 0,
        num_classes: int = 3,
        *,
        max_objects: int = 4,
        cache: bool = True,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split={split!r} is not known; use one of {sorted(_SPLITS)}.")
        if n < 0:
            raise ValueError(f"n={n} must be >= 0.")
        if img_size < 16:
            raise ValueError(f"img_size={img_size} is too small to draw shapes on; use >= 16.")
        if not 1 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(
                f"num_classes={num_classes} is out of range; the generator draws "
                f"{len(CLASS_NAMES)} shapes {CLASS_NAMES}, so use 1..{len(CLASS_NAMES)}."
            )
        if max_objects < 1:
            raise ValueError(f"max_objects={max_objects} must be >= 1.")
        self.split = split
        self.n = int(n)
        self.img_size = int(img_size)
        self.seed = int(seed)
        self.num_classes = int(num_classes)
        self.max_objects = int(max_objects)
        self.class_names: tuple[str, ...] = CLASS_NAMES[:num_classes]
        self.cache = cache
        self.size_range = _SIZE_RANGE  # longer box side, as a fraction of the image side
        self.aspect_range = (0.7, 1.0 / 0.7)  # width / height of a box
        self.max_overlap = _MAX_OVERLAP  # intersection / smaller box area allowed between two objects
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Pixel-centre coordinates, shared by every drawing call.
        coords = np.arange(self.img_size, dtype=np.float32) + 0.5
        self._yy, self._xx = np.meshgrid(coords, coords, indexing="ij")
        self._upsample = _bilinear_matrix(4, self.img_size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} is out of range for a dataset of {self.n} images.")
        item = self._cache.get(index)
        if item is None:
            item = self._render(index)
            if self.cache:
                self._cache[index] = item
        pixels, targets = item
        return torch.from_numpy(pixels).float().div_(255.0), torch.from_numpy(targets.copy())

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw image ``index``: uint8 (3, H, W) pixels and float32 (n_obj, 5) targets."""
        rng = np.random.default_rng((self.seed, _SPLITS[self.split], index))
        size = self.img_size
        image = self._background(rng)
        boxes: list[tuple[float, float, float, float]] = []
        rows: list[list[float]] = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            cls = int(rng.integers(self.num_classes))
            box = self._place(rng, boxes)
            if box is None:
                continue
            cx, cy, w, h = box
            boxes.append(box)
            alpha = _shape_alpha(cls, self._xx - cx, self._yy - cy, w / 2, h / 2)
            colour = _contrasting_colour(rng, image, box)
            # A mild linear shading across the object, so its colour is not one flat value.
            angle = rng.uniform(0, 2 * math.pi)
            ramp = ((self._xx - cx) * math.cos(angle) + (self._yy - cy) * math.sin(angle)) / max(
                w, h
            )
            paint = colour[:, None, None] * (1.0 + rng.uniform(-0.3, 0.3) * ramp)[None]
            image = image * (1.0 - alpha[None]) + paint * alpha[None]
            rows.append([cls, cx / size, cy / size, w / size, h / size])
        image += rng.uniform(0.01, 0.04) * rng.standard_normal(image.shape, dtype=np.float32)
        pixels = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
        targets = np.asarray(rows, dtype=np.float32).reshape(-1, 5)
        return pixels, targets

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A gradient between two colours, plus blotches, stripes and noise: (3, H, W) float32."""
        size = self.img_size
        xx, yy = self._xx / size, self._yy / size
        start = rng.uniform(0.1, 0.9, 3).astype(np.float32)
        end = np.clip(start + rng.normal(0.0, 0.25, 3), 0.0, 1.0).astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        image = start[:, None, None] + (end - start)[:, None, None] * ramp[None]
        # Low-frequency blotches: a 4x4 noise grid, upsampled bilinearly (U @ G @ U^T).
        grid = rng.normal(0.0, rng.uniform(0.02, 0.10), (3, 4, 4)).astype(np.float32)
        image = image + self._upsample @ grid @ self._upsample.T
        # Stripes at a random angle and frequency, with per-channel strength.
        angle = rng.uniform(0, 2 * math.pi)
        phase = (
            2 * math.pi * (rng.uniform(2.0, 9.0) * (xx * math.cos(angle) + yy * math.sin(angle)))
        )
        stripes = np.sin(phase + rng.uniform(0, 2 * math.pi))
        image = image + rng.uniform(0.0, 0.12, 3).astype(np.float32)[:, None, None] * stripes[None]
        return image.astype(np.float32)

    def _place(
        self, rng: np.random.Generator, boxes: Sequence[tuple[float, float, float, float]]
    ) -> tuple[float, float, float, float] | None:
        """A box (cx, cy, w, h) in pixels, inside the image, overlapping earlier ones by at most ``max_overlap``."""
        size = self.img_size
        for _ in range(_PLACEMENT_TRIES):
            side = rng.uniform(*self.size_range) * size
            aspect = math.exp(rng.uniform(math.log(self.aspect_range[0]), math.log(self.aspect_range[1])))
            w, h = (side, side / aspect) if aspect >= 1.0 else (side * aspect, side)
            cx = rng.uniform(w / 2, size - w / 2)
            cy = rng.uniform(h / 2, size - h / 2)
            if all(_overlap((cx, cy, w, h), other) <= self.max_overlap for other in boxes):
                return cx, cy, w, h
        return None


def collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a list of dataset items into one detection batch.

    Args:
        batch: ``(image (3, H, W), targets (n_i, 5))`` pairs.

    Returns:
        ``images`` (B, 3, H, W) and ``targets`` (M, 6) = ``[batch_idx, cls, cx, cy, w, h]``, the
        layout that :class:`fxfusion.demo.loss.YoloLoss` reads.

    Example:
        >>> from fxfusion.demo.data import ShapesDataset, collate
        >>> ds = ShapesDataset("train", n=2, img_size=64)
        >>> images, targets = collate([ds[0], ds[1]])
        >>> images.shape, targets.shape[1]
        (torch.Size([2, 3, 64, 64]), 6)
        >>> targets[:, 0].unique().tolist()  # the batch index of each box
        [0.0, 1.0]
    """
    images = torch.stack([image for image, _ in batch])
    rows = [
        torch.cat([torch.full((t.shape[0], 1), float(i), dtype=t.dtype), t], dim=1)
        for i, (_, t) in enumerate(batch)
    ]
    targets = torch.cat(rows) if rows else torch.zeros((0, 6))
    return images, targets


def make_loader(
    dataset: Dataset,
    batch_size: int = 16,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over ``dataset`` that batches with :func:`collate` and shuffles reproducibly.

    Args:
        dataset: usually a :class:`ShapesDataset`.
        batch_size: images per batch.
        shuffle: reshuffle every pass, from a generator seeded with ``seed``.
        seed: seed of the shuffling generator.
        drop_last: drop a final incomplete batch.
        num_workers: worker processes. The default 0 keeps the in-memory cache shared and is the
            fastest choice for small synthetic images.

    Returns:
        A ``torch.utils.data.DataLoader`` yielding ``(images, targets)`` batches.

    Example:
        >>> from fxfusion.demo.data import ShapesDataset, make_loader
        >>> loader = make_loader(ShapesDataset("train", n=8, img_size=64), batch_size=4)
        >>> len(loader)
        2
        >>> images, targets = next(iter(loader))
        >>> images.shape, targets.shape[1]
        (torch.Size([4, 3, 64, 64]), 6)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def write_yolo_dataset(root: str | os.PathLike, n_train: int = 64, n_val: int = 16, img_size: int = 96,
                       seed: int = 0, num_classes: int = 3) -> Path:
    """Write the shapes as a dataset in Ultralytics' layout; returns its ``data.yaml``.

    ``images/{train,val}/<i>.png`` and ``labels/{train,val}/<i>.txt`` (one ``cls cx cy w h`` row per
    object, normalized: the same rows :class:`ShapesDataset` returns). Needs Pillow (Ultralytics
    brings it).

    Example:
        >>> import tempfile
        >>> yaml = write_yolo_dataset(tempfile.mkdtemp(), n_train=2, n_val=1, img_size=32)
        >>> sorted(p.name for p in (yaml.parent / "labels" / "train").iterdir())
        ['0.txt', '1.txt']
    """
    from PIL import Image

    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        ds = ShapesDataset(split, n=n, img_size=img_size, seed=seed, num_classes=num_classes, cache=False)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels, targets = ds._render(i)
            Image.fromarray(pixels.transpose(1, 2, 0)).save(root / "images" / split / f"{i}.png")
            rows = [f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in targets.tolist()]
            (root / "labels" / split / f"{i}.txt").write_text("".join(r + "\n" for r in rows))
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASS_NAMES[:num_classes]))
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return yaml


def _shape_alpha(cls: int, dx: np.ndarray, dy: np.ndarray, hw: float, hh: float) -> np.ndarray:
    """Coverage in [0, 1] of shape ``cls`` with box half-sizes (hw, hh), centred at dx = dy = 0.

    Each shape is given by an (approximate) signed distance in pixels, positive inside; clipping
    ``sd + 0.5`` to [0, 1] anti-aliases the edge over one pixel. Every shape touches all four sides
    of its box, so the box is exact.
    """
    ax, ay = np.abs(dx), np.abs(dy)
    if cls in (0, 4):  # ellipse; the ring removes an inner ellipse
        radius = np.sqrt((dx / hw) ** 2 + (dy / hh) ** 2)
        sd = (1.0 - radius) * min(hw, hh)
        if cls == 4:
            sd = np.minimum(sd, (radius - 0.55) * min(hw, hh))
    elif cls == 1:  # rectangle
        sd = np.minimum(hw - ax, hh - ay)
    elif cls == 2:  # triangle, apex at the top centre, base along the bottom edge
        slant = (hw * (dy + hh) / (2 * hh) - ax) / math.hypot(1.0, hw / (2 * hh))
        sd = np.minimum(hh - dy, slant)
    elif cls == 3:  # diamond: |dx|/hw + |dy|/hh <= 1
        sd = (hw * hh - hh * ax - hw * ay) / math.hypot(hw, hh)
    elif cls == 5:  # plus sign, arms 0.6 of the box thick
        sd = np.maximum(np.minimum(hw - ax, 0.3 * hh - ay), np.minimum(0.3 * hw - ax, hh - ay))
    else:
        raise AssertionError(f"no drawing for class {cls}")
    return np.clip(sd + 0.5, 0.0, 1.0).astype(np.float32)


def _contrasting_colour(
    rng: np.random.Generator, image: np.ndarray, box: tuple[float, float, float, float]
) -> np.ndarray:
    """A random colour far enough from the mean colour under ``box`` to stay visible."""
    cx, cy, w, h = box
    x0, x1 = int(cx - w / 2), math.ceil(cx + w / 2)
    y0, y1 = int(cy - h / 2), math.ceil(cy + h / 2)
    under = image[:, y0:y1, x0:x1].reshape(3, -1).mean(axis=1)
    best, best_distance = under, -1.0
    for _ in range(10):
        colour = rng.uniform(0.0, 1.0, 3)
        distance = float(np.linalg.norm(colour - under))
        if distance > 0.45:
            return colour.astype(np.float32)
        if distance > best_distance:
            best, best_distance = colour, distance
    return best.astype(np.float32)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection of boxes a and b (cx, cy, w, h) over the area of the smaller one."""
    iw = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    ih = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix that linearly interpolates n_in samples onto n_out pixel centres."""
    pos = (np.arange(n_out) + 0.5) / n_out * n_in - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    matrix[np.arange(n_out), lo] += 1.0 - frac
    matrix[np.arange(n_out), hi] += frac
    return matrix
