"""Can deploy fold a site exactly? Decided at placement, with deploy's own planner.

A site whose gate is open at the end of QAT deploys by folding its per-channel affine into
neighbouring layers (:mod:`~fxfusion.passes.fold_plan`). Where no exact fold exists the site
stays an explicit per-channel op, and the deployed model no longer has the original topology.
:func:`predict_folds` asks the planner on a scratch copy, before any training: BatchNorm folded
into its conv as ``quantize`` and ``deploy`` will do, every site frozen with *generic* scales
(a different positive scale per channel and per branch, a non-zero shift; channel-uniform where a
LayerNorm reads a site without per-channel γ, as ``stats="auto"`` then gives) and the plan made. A site the plan can
fold with these folds with the trained ones: the plan depends on the dataflow, on the scales'
signs, and on whether they are channel-uniform, and the generic scales are the hardest case of
each.
"""

from __future__ import annotations

import torch
from torch import nn

from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion
from fxfusion.passes.fold_plan import SiteFold, analyse, feeds_layernorm, plan
from fxfusion.passes.quantize import fold_batchnorms
from fxfusion.passes.runtime import eval_mode, set_submodule, structural_copy

__all__ = ["FOLDS", "predict_folds", "verdict"]

# What rewrite(fold=...) accepts: a site is placed when deploy folds it
FOLDS = {
    "exact": "exactly",
    "approximate": "into the original topology (exactly, or with a measured border approximation)",
    "any": "or not (an explicit per-channel op may remain after deploy)",
}


def predict_folds(model: nn.Module, batch: tuple, conv_bn: list[tuple[str, str]] | None = None
                  ) -> dict[str, SiteFold]:
    """Deploy's decision for every GABFusion site of ``model`` (not changed), by site path.

    ``conv_bn``: the model's conv -> BatchNorm pairs if known (:func:`~fxfusion.passes.quantize.conv_bn_pairs`).
    """
    work = structural_copy(model)  # folding and freezing replace tensors and modules, never write into them
    with eval_mode(work):
        fold_batchnorms(work, conv_bn)
        graph = analyse(work, batch)
        sites = {p: m for p, m in work.named_modules() if isinstance(m, GABFusion)}
        for path, m in sites.items():
            if path in graph.sizes:
                # channel-uniform only as stats="ln" makes it, and only without a per-channel γ (the gated
                # form and affine=True have one)
                uniform = feeds_layernorm(path, graph) and m.weight is None
                set_submodule(work, path, _generic(m, graph.sizes[path], uniform))
        frozen = {p: m for p, m in work.named_modules() if isinstance(m, DeployedFusion)}
        decisions = plan(frozen, graph)
    return {d.site: d for d in decisions}


def verdict(decision: SiteFold | None) -> str:
    """``"exact"``, ``"approximate"`` or ``"explicit"`` for a decision (None: never ran)."""
    if decision is None or not decision.folded:
        return "explicit"
    return "exact" if decision.exact else "approximate"


def _generic(m: GABFusion, sizes: list[int], uniform: bool) -> DeployedFusion:
    c = sum(sizes) if m.op == "cat" else sizes[0]
    scale = torch.full((c,), 0.8) if uniform else torch.linspace(0.5, 1.5, c)
    shift = torch.full((c,), 0.1) if uniform else torch.linspace(-0.1, 0.2, c)
    parts = list(scale.split(sizes)) if m.op == "cat" else [scale] * m.num_branches
    alpha = [1.0 + 0.25 * i for i in range(m.num_branches)]  # trained α differ between branches
    return DeployedFusion(m.op, m.num_branches, m.dim, add_tree=m.add_tree,
                          scales=[alpha[i] * parts[i] for i in range(m.num_branches)], shift=shift)
