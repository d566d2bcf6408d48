"""Deploy, step 1: freeze each GABFusion site's normalization into a per-channel affine.

After QAT a site computes ``y = N(h)`` with ``h = fuse(α_1·x_1, ..., α_K·x_K)`` (for a
function-preserving site, the gated blend with the plain fusion). Deployment replaces ``N`` by a
fixed ``A⊙h + B`` per channel, fitted on calibration data (paper §Deployment):

- ``stats="fit"``: ``A_c, B_c`` by least squares per channel, the affine closest to the site's
  output on that data (always used for a function-preserving site: its output blends the fusion
  and ``γ⊙N(h) + β``, not a plain LayerNorm). A constant channel, or a fitted slope <= 0 (it would
  break the folds through ReLU), keeps the LayerNorm's own positive scale.
- a site without normalization (``norm="none"``) already is ``γ⊙h + β`` (or ``h``): taken as it is.
- ``stats="ln"``: the paper's formula, the LayerNorm's averaged statistics:
  ``A = 1/sqrt(σ0² + ε)``, ``B = −μ0·A``, with γ, β folded in when the site has them. Only this
  channel-uniform affine passes a LayerNorm that reads the site exactly.

Each site becomes a :class:`~fxfusion.deployed.DeployedFusion` with branch scales ``α_i·A`` and
shift ``B``; a site whose gate is closed becomes the bare op. The deviation
``|N(h) − (A⊙h + B)|`` is measured on the same data, per site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion, branches
from fxfusion.passes.runtime import eval_mode, removing, set_submodule

__all__ = ["FrozenSite", "freeze"]


@dataclass
class FrozenSite:
    """One frozen site: its affine ``A⊙h + B`` and how far that is from the trained normalization."""

    scale: Tensor
    shift: Tensor
    max_dev: float = 0.0
    mean_dev: float = 0.0


def freeze(model: nn.Module, batches: list[tuple], *, stats: str | dict[str, str] = "fit",
           progress: bool = False) -> dict[str, FrozenSite]:
    """Replace every GABFusion site of ``model`` (in place) by its frozen :class:`DeployedFusion`.

    Args:
        model: a rewritten model (quantized or not).
        batches: calibration inputs, as :func:`~fxfusion.passes.calibrate.calibration_batches` gives.
        stats: ``"fit"`` or ``"ln"`` (module docstring), or a dict site path -> either.
        progress: show a progress bar.

    Returns:
        Per site path, the :class:`FrozenSite` (closed-gate sites: identity affine, deviation 0).

    Raises:
        ValueError: a site that the calibration forward never ran: its statistics are unknown.
    """
    fusions = {p: m for p, m in model.named_modules() if isinstance(m, GABFusion)}
    result: dict[str, FrozenSite] = {}
    for p, m in list(fusions.items()):
        if m.gate_closed():  # computes the plain fusion: nothing to freeze
            set_submodule(model, p, DeployedFusion.bare(m))
            result[p] = FrozenSite(torch.ones(m.channels), torch.zeros(m.channels))
            del fusions[p]
    acc = {p: _Stats(m) for p, m in fusions.items()}
    with eval_mode(model), torch.no_grad():
        with removing(m.register_forward_hook(acc[p].observe) for p, m in fusions.items()):
            for b in _progress(batches, progress, "deploy: LayerNorm statistics"):
                model(*b)
        missing = [p for p, st in acc.items() if st.n == 0]
        if missing:
            raise ValueError(f"deploy: the calibration forward never ran the GABFusion site(s) {missing}, so their "
                             "normalization cannot be frozen; pass calibration data that exercises every branch")
        for p, m in fusions.items():
            scale, shift = acc[p].affine(stats if isinstance(stats, str) else stats.get(p, "fit"))
            frozen = DeployedFusion.from_training(m, scale, shift, acc[p].widths)
            set_submodule(model, p, frozen)
            acc[p].frozen = frozen
            result[p] = FrozenSite(scale.float(), shift.float())
        # measure the freeze on the same data: each frozen site against the trained one on its inputs
        with removing(acc[p].frozen.register_forward_hook(acc[p].measure) for p in fusions):
            for b in batches:
                model(*b)
    for p, st in acc.items():
        result[p].max_dev, result[p].mean_dev = st.dev_max, st.dev_sum / max(st.dev_n, 1)
    return result


class _Stats:
    """Running sums for one site: LN statistics, per-channel fit, and the freeze deviation."""

    def __init__(self, m: GABFusion) -> None:
        self.m, self.frozen, self.widths = m, None, None
        self.n = 0
        self.mu_sum = self.var_sum = 0.0
        self.sh = self.shh = self.sy = self.shy = None
        self.dev_max, self.dev_sum, self.dev_n = 0.0, 0.0, 0

    def observe(self, m: GABFusion, inputs: tuple, out: Tensor) -> None:
        xs = branches(inputs)
        self.widths = [x.shape[m.dim] for x in xs]
        a = m.alpha()
        h = m.fuse([a[i] * x for i, x in enumerate(xs)])
        h = h.movedim(m.dim, -1).reshape(-1, h.shape[m.dim]).double()
        y = out.movedim(m.dim, -1).reshape(-1, h.shape[1]).double()
        self.n += h.shape[0]
        self.mu_sum += float(h.mean(1).sum())
        self.var_sum += float(h.var(1, unbiased=False).sum())
        if self.sh is None:
            self.sh, self.shh, self.sy, self.shy = (torch.zeros(h.shape[1], dtype=torch.float64) for _ in range(4))
        self.sh += h.sum(0)
        self.shh += (h * h).sum(0)
        self.sy += y.sum(0)
        self.shy += (h * y).sum(0)

    def measure(self, frozen: DeployedFusion, inputs: tuple, out: Tensor) -> None:
        dev = (self.m(*branches(inputs)) - out).abs()  # the trained site on the same inputs (no hooks)
        self.dev_max = max(self.dev_max, float(dev.max()))
        self.dev_sum += float(dev.sum())
        self.dev_n += dev.numel()

    def affine(self, stats: str) -> tuple[Tensor, Tensor]:
        m, c = self.m, self.sh.shape[0]
        if m.norm == "none" and (not m.preserve or float(m.mix) == 1.0):  # already γ⊙h + β: exact
            ones = torch.ones(c, dtype=torch.float64)
            return ((m.gamma().detach().double(), m.bias.detach().double()) if m.weight is not None
                    else (ones, torch.zeros_like(ones)))
        if m.preserve:
            stats = "fit"  # its output blends the fusion and γ⊙LN + β: no plain LayerNorm
        mu0, var0 = self.mu_sum / self.n, self.var_sum / self.n
        if stats == "fit":
            mean_h, mean_y = self.sh / self.n, self.sy / self.n
            var_h = self.shh / self.n - mean_h ** 2
            cov = self.shy / self.n - mean_h * mean_y
            ln_scale = 1.0 / math.sqrt(var0 + m.eps)
            if m.weight is not None:
                ln_scale = ln_scale * m.gamma().detach().double()
            fitted = cov / var_h.clamp_min(1e-12)
            constant = var_h <= 1e-10 * (var_h.max() + 1e-30)
            usable = ~constant & (fitted > 0) & torch.isfinite(fitted)
            fallback = torch.as_tensor(ln_scale, dtype=torch.float64).expand_as(fitted)
            # a channel constant on the data (a dead ReLU) fits any slope: take a positive one, so that
            # the fold through ReLU stays possible (its intercept makes the output exact on that data)
            fallback = torch.where(constant, fallback.abs().clamp_min(1e-6), fallback)
            scale = torch.where(usable, fitted, fallback)
            return scale, mean_y - scale * mean_h
        a = torch.full((c,), 1.0 / math.sqrt(var0 + m.eps), dtype=torch.float64)
        b = -mu0 * a
        if m.weight is not None:
            g, beta = m.gamma().detach().double(), m.bias.detach().double()
            a, b = g * a, g * b + beta
        return a, b


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)
