"""Calibration data, and the calibration of function-preserving GABFusion sites after ``rewrite``.

Both ``rewrite`` (the statistics γ, β of each site start from) and ``deploy`` (the frozen LayerNorm
affine) take a few batches of real inputs; :func:`calibration_batches` is their one way to read
them. :func:`calibrate_sites` measures, at every ``GABFusion(preserve=True)`` site, the
per-channel mean and spread of the original fusion ``fuse(x_1..x_K)``, hands them to
:meth:`GABFusion.calibrate`, and measures what the rewrite did to each site's output:

- ``max |Δ| now``: the largest difference from the original fusion with the gate as it is (0
  right after rewrite);
- ``rel. L2 at mix=1``: ``‖out − fuse(x)‖ / ‖fuse(x)‖`` with full normalization, i.e. how far the
  site's output will move once :class:`fxfusion.NormSchedule` has opened the gate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fxfusion.gabfusion import GABFusion, branches, preserving_sites

__all__ = ["calibration_batches", "calibrate_sites"]


def calibration_batches(calib_data: Iterable, max_batches: int | None = None) -> list[tuple]:
    """Materialize calibration inputs as a list of input tuples; refuse empty or non-finite data.

    A tensor is one batch (as ``example_inputs`` is elsewhere), not a sequence of samples.
    """
    if isinstance(calib_data, Tensor):
        calib_data = [calib_data]
    batches = []
    for i, batch in enumerate(calib_data):
        if max_batches is not None and i >= max_batches:
            break
        inputs = (batch[0],) if isinstance(batch, (list, tuple)) else (batch,)
        for x in inputs:
            if not isinstance(x, Tensor):
                raise TypeError(f"calibration batch {i}: expected a tensor input, got {type(x).__name__}")
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise ValueError(f"calibration batch {i} contains NaN or inf values; clean the calibration data")
        batches.append(inputs)
    if not batches:
        raise ValueError("the calibration data is empty: pass a non-empty DataLoader or list of batches")
    return batches


def calibrate_sites(model: nn.Module, batches: list[tuple]) -> dict[str, dict[str, float]]:
    """Calibrate every function-preserving GABFusion site of ``model`` on ``batches``, in place.

    Returns ``{site path: {"max |Δ| now": ..., "rel. L2 at mix=1": ...}}``. Sites are calibrated
    in one pass: each sees its true inputs, because every site upstream returns the original
    fusion while its gate is closed.
    """
    sites = preserving_sites(model)
    if not sites:
        return {}
    acc = {p: _Moments() for p in sites}
    handles = [m.register_forward_hook(lambda mod, inp, out, p=p: acc[p].add(_fused(mod, inp, scaled=False), mod.dim))
               for p, m in sites.items()]
    was_training = model.training
    model.eval()  # BatchNorm running statistics must not move
    try:
        with torch.no_grad():
            for b in batches:
                model(*b)
        for h in handles:
            h.remove()
        for p, m in sites.items():
            m.calibrate(*acc[p].mean_std())
        dev = {p: _Deviation() for p in sites}
        handles = [m.register_forward_hook(lambda mod, inp, out, p=p: dev[p].add(mod, inp, out))
                   for p, m in sites.items()]
        with torch.no_grad():
            for b in batches:
                model(*b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {p: d.result() for p, d in dev.items()}


def _fused(m: GABFusion, inp: tuple, scaled: bool = True) -> Tensor:
    """``fuse(α_i·x_i)`` (scaled) or the original ``fuse(x_i)`` of the inputs a site received."""
    xs = branches(inp)
    a = m.alpha().detach()
    return m.fuse([a[i] * x for i, x in enumerate(xs)] if scaled else xs)


class _Moments:
    """Per-channel running mean and variance (float64) of a tensor along its feature axis."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, None, None

    def add(self, h: Tensor, dim: int) -> None:
        flat = h.detach().movedim(dim, -1).reshape(-1, h.shape[dim]).double()
        if self.s is None:
            self.s, self.ss = flat.sum(0), (flat * flat).sum(0)
        else:
            self.s, self.ss = self.s + flat.sum(0), self.ss + (flat * flat).sum(0)
        self.n += flat.shape[0]

    def mean_std(self) -> tuple[Tensor, Tensor]:
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp_min(0.0)
        return mean.float(), var.sqrt().float()


class _Deviation:
    """How far a site's output is from the original fusion: now, and with the gate fully open."""

    def __init__(self) -> None:
        self.max_now, self.err_full, self.ref = 0.0, 0.0, 0.0

    def add(self, m: GABFusion, inp: tuple, out: Tensor) -> None:
        original = _fused(m, inp, scaled=False)
        self.max_now = max(self.max_now, float((out - original).abs().max()))
        mix = m.mix.clone()
        m.mix.fill_(1.0)
        try:
            full = m.normalize(_fused(m, inp))
        finally:
            m.mix.copy_(mix)
        self.err_full += float((full - original).pow(2).sum())
        self.ref += float(original.pow(2).sum())

    def result(self) -> dict[str, float]:
        return {"max |Δ| now": self.max_now, "rel. L2 at mix=1": (self.err_full / max(self.ref, 1e-30)) ** 0.5}
