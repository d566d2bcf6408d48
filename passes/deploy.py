"""Deploy: fold every GABFusion site away, so that the model has its original topology again.

The steps, each in its own file:

1. :mod:`~fxfusion.passes.freeze`: each site's normalization becomes a fixed per-channel affine
   fitted on calibration data; the site becomes a :class:`~fxfusion.deployed.DeployedFusion`
   with branch scales and a shift (a site whose gate is closed becomes the bare op).
2. :mod:`~fxfusion.passes.fold_plan`: a typed decision per site (producers, consumers, or an
   explicit op with the reason), from the dataflow of one forward; nothing changes yet.
3. :mod:`~fxfusion.passes.fold_apply`: the decisions are carried out, and the quantizers whose
   input changed are re-fitted.
4. Here: owners whose sites are all bare get their original class and forward back, and the
   deviation from the un-deployed model is measured on the calibration data.

BatchNorm that follows a conv is folded first (the quantize pass already did it for QAT models).
In a model quantized with power-of-two scales, every BatchNorm left is then written as the two
float ops ``x·a + b`` (:class:`~fxfusion.deployed.ChannelAffine`), which onnxruntime rounds as
PyTorch does, so that the export stays bit-exact. For the same reason its ``nn.Hardsigmoid`` and
``nn.Hardswish`` become :class:`~fxfusion.deployed.OrtHardsigmoid` /
:class:`~fxfusion.deployed.OrtHardswish`, which compute onnxruntime's formula.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fxfusion.ada import detach_ada
from fxfusion.deployed import ChannelAffine, DeployedFusion, OrtHardsigmoid, OrtHardswish
from fxfusion.passes.calibrate import calibration_batches
from fxfusion.passes.fold_apply import apply, recalibrate
from fxfusion.passes.fold_plan import analyse, feeds_layernorm, plan
from fxfusion.passes.freeze import freeze
from fxfusion.passes.quantize import _BNS, fold_batchnorms
from fxfusion.passes.rewrite import gabfusion_modules, restore_forward
from fxfusion.passes.runtime import eval_mode, network, paused_gc, set_submodule, tensors
from fxfusion.quant import is_quantizer
from fxfusion.report import format_table

__all__ = ["DeployReport", "deploy"]


@dataclass
class DeployReport:
    """Per site: the fold target, exactness, measured deviation, re-calibrated quantizers."""

    sites: list[dict] = field(default_factory=list)
    output_deviation: dict = field(default_factory=dict)
    bn_folded: list[str] = field(default_factory=list)
    recalibrated: list[str] = field(default_factory=list)
    bn_as_affine: list[str] = field(default_factory=list)
    ort_activations: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [format_table(self.sites, title=f"Deployed {len(self.sites)} GABFusion site(s)")]
        if self.output_deviation:
            parts.append(format_table([self.output_deviation], title="Model output vs the un-deployed model"))
        if self.recalibrated:
            parts.append(f"Re-calibrated quantizers ({len(self.recalibrated)}): " + ", ".join(self.recalibrated))
        if self.bn_as_affine:
            parts.append(f"BatchNorms written as x*a + b for a bit-exact export ({len(self.bn_as_affine)}): "
                         + ", ".join(self.bn_as_affine))
        if self.ort_activations:
            parts.append("Hard-sigmoid/-swish computed with onnxruntime's rounding for a bit-exact export "
                         f"({len(self.ort_activations)}): " + ", ".join(self.ort_activations))
        return "\n\n".join(parts)

    def to_dict(self) -> dict:
        return {"sites": self.sites, "output_deviation": self.output_deviation, "bn_folded": self.bn_folded,
                "recalibrated": self.recalibrated, "bn_as_affine": self.bn_as_affine,
                "ort_activations": self.ort_activations}


@paused_gc()
def deploy(
    model: nn.Module,
    calib_data: Iterable,
    *,
    stats: str = "auto",
    max_batches: int | None = 8,
    progress: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Fold every GABFusion site away and return a model with the original topology.

    Args:
        model: a rewritten (and usually quantized, QAT-trained) model.
        calib_data: an iterable of batches: tensors, or tuples whose first element is
            the model input (a DataLoader of ``(images, targets)`` works).
        stats: ``"auto"`` (default: ``"ln"`` where a LayerNorm reads the site, so that it can
            absorb the channel-uniform affine exactly, ``"fit"`` elsewhere), ``"fit"``
            (per-channel least squares) or ``"ln"`` (the paper's averaged statistics).
        max_batches: how many calibration batches to use (None: all).
        progress: show a progress bar.
        inplace: edit ``model`` instead of a deep copy.

    Returns:
        The deployed model, still trainable. When every site is exact and the output deviation
        is 0 (e.g. every gate was closed by :class:`fxfusion.NormSchedule`) there is nothing to
        recover; otherwise fine-tune it briefly (the paper uses Adam, lr 2e-5). Its report is
        ``model.fxfusion_reports["deploy"]``.

    Example:
        >>> from fxfusion.zoo import build
        >>> qat_model = fxfusion.quantize(fxfusion.rewrite(build("resnet"), x), x)
        >>> deployed = fxfusion.deploy(qat_model, [x], progress=False)
        >>> deployed.fxfusion_reports["deploy"].sites[0]["exact"]
        True
    """
    model = network(model, "deploy", edits=True)
    if stats not in ("auto", "ln", "fit"):
        raise ValueError(f"stats={stats!r} is not one of ('auto', 'ln', 'fit')")
    batches = calibration_batches(calib_data, max_batches)
    if not inplace:
        model = copy.deepcopy(model)
    detach_ada(model)  # ADA's hooks (inert in a copy) would stay on the deployed model
    with eval_mode(model):
        report = DeployReport(bn_folded=fold_batchnorms(model))
        reference = _outputs(model, batches)
        owners = {p.rpartition(".")[0] for p in gabfusion_modules(model)}
        graph = analyse(model, batches[0])  # the dataflow does not change when the sites freeze
        if stats == "auto":
            stats = {p: "ln" if feeds_layernorm(p, graph) else "fit" for p in gabfusion_modules(model)}
        frozen_sites = freeze(model, batches, stats=stats, progress=progress)
        frozen = _outputs(model, batches)

        sites = {p: m for p, m in model.named_modules() if isinstance(m, DeployedFusion)}
        decisions = plan(sites, graph)
        to_recalibrate = apply(model, decisions)
        for d in decisions:
            report.sites.append({**d.row(), "ln_max_dev": frozen_sites[d.site].max_dev,
                                 "ln_mean_dev": frozen_sites[d.site].mean_dev})
        _restore_owners(model, owners)
        recalibrate(model, to_recalibrate, batches)
        report.recalibrated = sorted(to_recalibrate)
        if _all_pow2(model):
            report.bn_as_affine = _batchnorms_as_affines(model, batches[0])
            report.ort_activations = _hard_activations_as_ort(model)

        deployed = _outputs(model, batches)
    if any(not torch.isfinite(t).all() for ts in deployed for t in ts) and all(
            torch.isfinite(t).all() for ts in reference for t in ts):
        raise RuntimeError("deploy produced non-finite outputs where the model had none; please report this "
                           "with the deploy report:\n" + str(report))
    report.output_deviation = {
        "max_vs_undeployed": _max_dev(reference, deployed), "mean_vs_undeployed": _mean_dev(reference, deployed),
        "max_vs_frozen_ln": _max_dev(frozen, deployed), "mean_vs_frozen_ln": _mean_dev(frozen, deployed),
        "batches": len(batches)}
    model.__dict__.setdefault("fxfusion_reports", {})["deploy"] = report
    return model


def _all_pow2(model: nn.Module) -> bool:
    """Quantized with power-of-two scales everywhere: the only models whose export can be bit-exact."""
    quantizers = [m for m in model.modules() if is_quantizer(m)]
    return bool(quantizers) and all(getattr(q, "pow2", False) for q in quantizers)


_ORT_ACTIVATIONS = {nn.Hardsigmoid: OrtHardsigmoid, nn.Hardswish: OrtHardswish}


def _hard_activations_as_ort(model: nn.Module) -> list[str]:
    """Each ``nn.Hardsigmoid``/``nn.Hardswish`` (exact class) becomes its onnxruntime-rounded twin;
    returns their paths. A functional call (``F.hardswish``) is left as it is."""
    paths = [p for p, m in model.named_modules(remove_duplicate=False) if type(m) in _ORT_ACTIVATIONS]
    for path in paths:
        set_submodule(model, path, _ORT_ACTIVATIONS[type(model.get_submodule(path))]())
    return paths


def _batchnorms_as_affines(model: nn.Module, batch: tuple) -> list[str]:
    """With power-of-two scales everywhere, each BatchNorm left that the forward on ``batch`` calls
    becomes a ChannelAffine for its input's rank; returns their paths. (With free scales the conv
    sums differ anyway, and the BatchNorm node stays.)"""
    norms = {p: m for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not norms:  # every BatchNorm folded into a conv (all YOLO models): no forward needed
        return []
    ranks: dict[str, int] = {}

    def record(path: str):
        def hook(_module: nn.Module, args: tuple) -> None:  # returns None: the input is left as it is
            ranks.setdefault(path, args[0].dim())
        return hook

    # exactly the BatchNorm classes quantize folds: a subclass's forward may do more (timm's
    # BatchNormAct2d applies its activation too), and the affine would silently drop it
    hooks = [m.register_forward_pre_hook(record(p)) for p, m in norms.items()
             if type(m) in _BNS and m.running_mean is not None]
    try:
        if hooks:
            with torch.no_grad():
                model(*batch)
    finally:
        for h in hooks:
            h.remove()
    for path, rank in ranks.items():
        set_submodule(model, path, ChannelAffine.from_batchnorm(norms[path], rank))
    kept = sorted(set(norms) - set(ranks))
    if kept:
        warnings.warn(f"deploy: {len(kept)} BatchNorm(s) stay BatchNorm ({', '.join(kept[:5])}"
                      f"{', ...' if len(kept) > 5 else ''}): a subclass (its forward may do more than the "
                      "affine), without running statistics, or not called by the calibration forward. "
                      "onnxruntime may round them differently from PyTorch, so the export "
                      "is not guaranteed bit-exact there", stacklevel=3)
    return sorted(ranks)


def _restore_owners(model: nn.Module, owners: set[str]) -> None:
    """Owners whose sites are all bare get their original class and forward back (the sites go)."""
    for owner in owners:
        owner_module = model.get_submodule(owner) if owner else model
        children = [n for n, m in owner_module.named_children() if isinstance(m, DeployedFusion)]
        if all(getattr(owner_module, n).is_bare for n in children) and restore_forward(owner_module):
            for n in children:
                delattr(owner_module, n)


def _outputs(model: nn.Module, batches: list[tuple]) -> list[list[Tensor]]:
    with torch.no_grad():
        return [[t.detach().float() for t in tensors(model(*b))] for b in batches]


def _max_dev(a: list[list[Tensor]], b: list[list[Tensor]]) -> float:
    return max(float((x - y).abs().max()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _mean_dev(a: list[list[Tensor]], b: list[list[Tensor]]) -> float:
    total = sum(float((x - y).abs().sum()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    count = sum(x.numel() for xs in a for x in xs)
    return total / max(count, 1)
