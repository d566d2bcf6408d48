"""Figures of the demo: detections beside ground truth, and grouped bars (per-branch gradients).

matplotlib is an optional extra, imported only when a plot is drawn. Figures are drawn on an Agg
canvas owned by the figure, never through pyplot, so plotting neither needs a display nor changes
the backend of a user's own session.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["plot_bars", "plot_detections"]

_GT_COLOUR = "white"


def plot_detections(
    images: torch.Tensor,
    preds: Sequence[torch.Tensor],
    targets: torch.Tensor,
    class_names: Sequence[str],
    path: str | Path,
    *,
    max_images: int = 8,
    conf_thres: float = 0.25,
    columns: int = 4,
) -> Path:
    """Save a grid of images with predicted boxes (coloured, by class) and ground truth (dashed).

    Args:
        images: (B, 3, H, W) floats in [0, 1].
        preds: B tensors (n, 6) ``[x1, y1, x2, y2, conf, cls]`` in pixels, as returned by
            :func:`fxfusion.demo.postprocess.non_max_suppression`.
        targets: (M, 6) ``[batch_idx, cls, cx, cy, w, h]`` normalized, as returned by
            :func:`fxfusion.demo.data.collate`.
        class_names: name of each class index.
        path: where to write the PNG; parent folders are created.
        max_images: draw at most this many images of the batch.
        conf_thres: hide predictions below this confidence.
        columns: images per row.

    Returns:
        The path written.

    Example:
        >>> import shutil
        >>> import tempfile
        >>> from pathlib import Path
        >>> from fxfusion import zoo
        >>> from fxfusion.demo.data import ShapesDataset, make_loader
        >>> from fxfusion.demo.plots import plot_detections
        >>> from fxfusion.demo.postprocess import non_max_suppression
        >>> ds = ShapesDataset("val", n=4, img_size=64)
        >>> images, targets = next(iter(make_loader(ds, batch_size=4, shuffle=False)))
        >>> model = zoo.build("yolov5", nc=3)
        >>> preds = non_max_suppression(model.eval()(images), conf_thres=0.25)
        >>> out = Path(tempfile.mkdtemp())
        >>> path = plot_detections(images, preds, targets, ds.class_names, out / "detections.png")
        >>> path.name, path.stat().st_size > 0
        ('detections.png', True)
        >>> shutil.rmtree(out)
    """
    figure_cls, canvas_cls = _matplotlib()
    count = min(int(images.shape[0]), max_images)
    if count < 1:
        raise ValueError("plot_detections got an empty batch of images; pass at least one.")
    if len(preds) < count:
        raise ValueError(f"plot_detections got {len(preds)} predictions for {count} images.")
    height, width = int(images.shape[2]), int(images.shape[3])
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig = figure_cls(figsize=(3.0 * columns, 3.0 * rows), dpi=100)
    canvas_cls(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    colours = _class_colours(len(class_names))
    for k, ax in enumerate(axes):
        ax.axis("off")
        if k >= count:
            continue
        ax.imshow(images[k].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
        for cx, cy, w, h in targets[targets[:, 0] == k, 2:].tolist():
            x, y = (cx - w / 2) * width - 0.5, (cy - h / 2) * height - 0.5
            ax.add_patch(_rectangle(x, y, w * width, h * height, _GT_COLOUR, "--"))
        for x1, y1, x2, y2, conf, cls in preds[k].detach().cpu().tolist():
            if conf < conf_thres:
                continue
            colour = colours[int(cls) % len(colours)]
            ax.add_patch(_rectangle(x1 - 0.5, y1 - 0.5, x2 - x1, y2 - y1, colour, "-"))
            name = class_names[int(cls)] if 0 <= int(cls) < len(class_names) else str(int(cls))
            ax.text(
                x1 - 0.5,
                y1 - 1.5,
                f"{name} {conf:.2f}",
                color="black",
                fontsize=7,
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.5, "alpha": 0.8},
            )
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
    fig.suptitle("predictions (solid) and ground truth (dashed)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(
    table: Mapping[str, Mapping[str, float]],
    path: str | Path,
    title: str,
    *,
    ylabel: str = "",
    log_scale: bool = False,
) -> Path:
    """Save a grouped bar chart: one group per outer key, one bar (and legend entry) per inner key.

    Args:
        table: ``{group: {series: value}}``, e.g. ``{"neck.cat0": {"shallow": 0.2, "deep": 1.4}}``
            for per-branch gradient magnitudes at each fusion site. A series missing from a group
            leaves a gap.
        path: where to write the PNG; parent folders are created.
        title: figure title.
        ylabel: y-axis label.
        log_scale: use a logarithmic y axis (for values spanning decades).

    Returns:
        The path written.

    Example:
        >>> import shutil, tempfile
        >>> from pathlib import Path
        >>> from fxfusion.demo.plots import plot_bars
        >>> out = Path(tempfile.mkdtemp())
        >>> path = plot_bars({"cat0": {"fp32": 1.0, "w4a4": 3.2}}, out / "balance.png", "gradient ratio")
        >>> path.name, path.stat().st_size > 0
        ('balance.png', True)
        >>> shutil.rmtree(out)
    """
    figure_cls, canvas_cls = _matplotlib()
    if not table:
        raise ValueError("plot_bars got an empty table; pass {group: {series: value}}.")
    groups = list(table)
    series: list[str] = []
    for values in table.values():
        series.extend(name for name in values if name not in series)
    if not series:
        raise ValueError("plot_bars got groups without any values; pass {group: {series: value}}.")
    fig = figure_cls(
        figsize=(max(4.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.6), dpi=100
    )
    canvas_cls(fig)
    ax = fig.subplots()
    width = 0.8 / len(series)
    colours = _class_colours(len(series))
    for s, name in enumerate(series):
        xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [float(table[group].get(name, math.nan)) for group in groups]
        ax.bar(xs, ys, width=width, label=name, color=colours[s])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center"
    )
    ax.set_title(title)
    if ylabel:
        ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _rectangle(x: float, y: float, w: float, h: float, colour: Any, style: str) -> Any:
    """An unfilled matplotlib rectangle."""
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor=colour, linestyle=style, linewidth=1.5)


def _class_colours(n: int) -> list[Any]:
    """``n`` distinct colours from matplotlib's qualitative tab10 / tab20 maps."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path``, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _matplotlib() -> tuple[type, type]:
    """matplotlib's Figure and Agg canvas, or an ImportError that says how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            'plotting needs matplotlib; install the demo extra: pip install "fxfusion[demo]"'
        ) from e
    return Figure, FigureCanvasAgg
