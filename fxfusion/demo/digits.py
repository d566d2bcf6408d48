"""Detection scenes made of real handwritten digits: a second dataset, from data that ships offline.

scikit-learn ships the UCI handwritten digits (``load_digits``: 1,797 images of 8 x 8 pixels, 10
classes, written by 43 people). A scene writes 1 or 2 of them (``max_objects``), each upscaled
bilinearly into a box whose longer side is 24-40 px (capped at 0.6-0.9 of small images) with a
mild stretch (width/height 0.85-1.18), never overlapping another digit, in dark ink on paper of a
random tone with a little noise; each box is the tight box of the digit's ink. The digits are split
once (seeded) into a train pool (80 %) and a val pool (20 %), so val scenes show digit images the
detector never saw. Ten classes of similar strokes make this a harder task than the shapes, and
closer to what quantization error hurts: fine, class-discriminating detail.

Why these sizes: the zoo's small YOLOv5 (width 0.125) sees the image through a 6x6 stride-2 stem
and a stride-2 conv before its stride-8 head, so an 8 x 8 digit squeezed into 14-29 px keeps
only a few feature pixels per stroke. With the first version's 14-29 px digits, up to 4 per 64 px
scene, random aspect 0.7-1.43 and overlaps up to 25 %, the detector trained for 2,000 steps found
the digits (class-agnostic mAP@0.5 0.67) but barely learnt their classes: mAP@0.5 0.11-0.19 on val
and only 0.26 on its own train scenes, so it under-fit the classes (labels and boxes were right).
At the same settings, 24-40 px, at most 2, non-overlapping, mildly stretched digits score 0.72-0.79
(seeds 0-2); crowding them again (up to 3 digits, 22-38 px) fell back to 0.29, and keeping the old
digits but training 3x longer reached only 0.58.

Like the shapes, every scene is a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

import functools

import numpy as np

from fxfusion.demo.data import ShapesDataset, _bilinear_matrix

__all__ = ["DIGIT_NAMES", "DigitScenesDataset", "load_digit_images"]

DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))

_VAL_SHARE = 0.2
_INK = 0.25  # alpha above which a pixel counts as ink for the tight box
_SIDE_PX = (24.0, 40.0)  # longer side of a digit's paste box, in pixels (capped for small images)
_ASPECT = 0.85  # width/height of the paste box varies in [_ASPECT, 1/_ASPECT]: a mild stretch only
_MAX_OVERLAP = 0.0  # digits never overlap: an occluded digit is a guess, not a class


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 (1797, 8, 8) in 0..1 and int64 labels (the ``[bench]`` extra)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "DigitScenesDataset needs scikit-learn for its handwritten digits: pip install 'fxfusion[bench]'"
        ) from e
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


class DigitScenesDataset(ShapesDataset):
    """Seeded multi-digit detection scenes from scikit-learn's handwritten digits, 10 classes.

    Args:
        split: ``"train"`` or ``"val"``: scenes and digit images both come from disjoint pools.
        n: number of images.
        img_size: side of the square images, in pixels (at least 32).
        seed: base seed; it fixes the pool split and every scene.
        max_objects: at most this many digits per image (at least one is always drawn); 2 by
            default, and fewer are drawn when a new digit finds no free place.
        cache: keep generated images in memory (as uint8) after their first access.

    Items are ``(image (3, H, W) in [0, 1], targets (n_obj, 5) = [cls, cx, cy, w, h] normalized)``,
    as for :class:`~fxfusion.demo.data.ShapesDataset`; ``cls`` is the digit.

    Example:
        >>> from fxfusion.demo.digits import DigitScenesDataset
        >>> ds = DigitScenesDataset("train", n=4, img_size=64)
        >>> ds.class_names[:3], ds[0][0].shape
        (('0', '1', '2'), torch.Size([3, 64, 64]))
    """

    def __init__(
        self,
        split: str = "train",
        n: int = 1000,
        img_size: int = 64,
        seed: int = 0,
        *,
        max_objects: int = 2,
        cache: bool = True,
    ) -> None:
        if img_size < 32:
            raise ValueError(f"img_size={img_size} is too small for legible digits; use >= 32.")
        super().__init__(split, n, img_size, seed, num_classes=1, max_objects=max_objects, cache=cache)
        self.num_classes = len(DIGIT_NAMES)
        self.class_names = DIGIT_NAMES
        # Longer side of the paste box as a fraction of the image (ShapesDataset's convention), its
        # width/height range, and the overlap allowed between paste boxes (none).
        self.size_range = (min(_SIDE_PX[0], 0.6 * img_size) / img_size, min(_SIDE_PX[1], 0.9 * img_size) / img_size)
        self.aspect_range = (_ASPECT, 1.0 / _ASPECT)
        self.max_overlap = _MAX_OVERLAP
        images, labels = load_digit_images()
        order = np.random.default_rng((self.seed, 7)).permutation(len(labels))
        n_val = int(round(_VAL_SHARE * len(labels)))
        self.pool = order[:n_val] if split == "val" else order[n_val:]  # indices into load_digit_images()
        self._digits, self._labels = images[self.pool], labels[self.pool]

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Paper: one light tone, slightly tinted, with a faint horizontal shading: (3, H, W) float32."""
        tone = rng.uniform(0.7, 0.95) + rng.normal(0.0, 0.03, 3)
        shade = rng.uniform(-0.08, 0.08) * (self._xx / self.img_size - 0.5)
        return (tone[:, None, None] + shade[None]).astype(np.float32)

    def _render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw scene ``index``: uint8 (3, H, W) pixels and float32 (n_obj, 5) targets."""
        rng = np.random.default_rng((self.seed, 100 + (self.split == "val"), index))
        size = self.img_size
        image = self._background(rng)
        boxes: list[tuple[float, float, float, float]] = []
        rows: list[list[float]] = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            box = self._place(rng, boxes)
            if box is None:
                continue
            k = int(rng.integers(len(self._labels)))
            cx, cy, w, h = box
            x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
            pw, ph = max(8, int(round(w))), max(8, int(round(h)))
            pw, ph = min(pw, size - x0), min(ph, size - y0)
            alpha = _bilinear_matrix(8, ph) @ self._digits[k] @ _bilinear_matrix(8, pw).T
            ink_y, ink_x = np.nonzero(alpha > _INK)
            if ink_y.size == 0:
                continue
            colour = rng.uniform(0.0, 0.35, 3).astype(np.float32)  # ink: black, blue-black, brown-black
            region = image[:, y0:y0 + ph, x0:x0 + pw]
            image[:, y0:y0 + ph, x0:x0 + pw] = region * (1.0 - alpha[None]) + colour[:, None, None] * alpha[None]
            boxes.append(box)
            bx0, bx1 = x0 + ink_x.min(), x0 + ink_x.max() + 1
            by0, by1 = y0 + ink_y.min(), y0 + ink_y.max() + 1
            rows.append([float(self._labels[k]), (bx0 + bx1) / 2 / size, (by0 + by1) / 2 / size,
                         (bx1 - bx0) / size, (by1 - by0) / size])
        image += rng.uniform(0.01, 0.04) * rng.standard_normal(image.shape, dtype=np.float32)
        pixels = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
        return pixels, np.asarray(rows, dtype=np.float32).reshape(-1, 5)
