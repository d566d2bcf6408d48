"""Tests of fxfusion.demo.plots: each figure is written as a PNG."""

from __future__ import annotations

import sys

import pytest
import torch

from fxfusion.demo.data import ShapesDataset, collate
from fxfusion.demo.plots import plot_bars, plot_detections
from fxfusion.demo.postprocess import xywh2xyxy

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib")


def test_plot_detections_writes_png(matplotlib, tmp_path):
    ds = ShapesDataset("val", n=5, img_size=64)
    images, targets = collate([ds[i] for i in range(5)])
    preds = []
    for k in range(5):
        t = targets[targets[:, 0] == k]
        boxes = xywh2xyxy(t[:, 2:6]) * 64 + 2.0
        preds.append(torch.cat((boxes, torch.full_like(t[:, :1], 0.9), t[:, 1:2]), 1))
    path = plot_detections(images, preds, targets, ds.class_names, tmp_path / "sub" / "dets.png")
    assert path.read_bytes().startswith(_PNG_MAGIC)


def test_plot_bars_writes_png(matplotlib, tmp_path):
    table = {"cat0": {"shallow": 0.2, "deep": 1.4}, "cat1": {"shallow": 0.5}}
    path = plot_bars(table, tmp_path / "bars.png", "gradient balance", ylabel="|g|")
    assert path.read_bytes().startswith(_PNG_MAGIC)


def test_plot_bars_refuses_empty_table(matplotlib, tmp_path):
    with pytest.raises(ValueError, match="empty table"):
        plot_bars({}, tmp_path / "bars.png", "nothing")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "fxfusion\[demo\]"'):
        plot_bars({"a": {"b": 1.0}}, tmp_path / "bars.png", "title")
    assert not (tmp_path / "bars.png").exists()
