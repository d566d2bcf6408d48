"""Deploy, step 3: carry out the fold plan, then re-fit the quantizers whose input changed.

Each :data:`~fxfusion.passes.fold_plan.Action` changes one layer exactly as its docstring says;
each site then becomes the bare op (folded) or keeps an explicit per-channel op. A per-channel
weight quantizer of a layer whose rows were scaled is rescaled exactly (its range tensors × s);
every other quantizer whose input changed is re-initialized and its range re-fitted on
calibration data (:func:`recalibrate`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fxfusion.deployed import DeployedFusion
from fxfusion.passes.fold_plan import IntoBatchNorm, IntoLayerNorm, ScaleInputs, ScaleRows, SiteFold
from fxfusion.passes.runtime import removing, set_submodule
from fxfusion.quant import range_tensors

__all__ = ["apply", "recalibrate"]


def apply(model: nn.Module, decisions: list[SiteFold]) -> dict[str, nn.Module]:
    """Perform every decision on ``model`` in plan order; returns the quantizers to re-fit, by path."""
    recal: dict[str, nn.Module] = {}
    for d in decisions:
        for action in d.actions:
            if isinstance(action, ScaleRows):
                _scale_rows(action, recal)
            elif isinstance(action, ScaleInputs):
                _scale_inputs(action, recal)
            elif isinstance(action, IntoBatchNorm):
                _into_batchnorm(action.layer, action.scale, action.shift)
            elif isinstance(action, IntoLayerNorm):
                # LN(s h + b) = LN(h) for a uniform s > 0 and b, once ε is divided by s².
                action.layer.eps = action.layer.eps / float(action.scale[0]) ** 2
        if d.keep:
            continue
        site = model.get_submodule(d.site)
        if d.explicit is None:
            set_submodule(model, d.site, DeployedFusion.bare(site))
        else:
            scales, shift = d.explicit
            set_submodule(model, d.site, DeployedFusion(site.op, site.num_branches, site.dim, add_tree=site.add_tree,
                                                        scales=scales, shift=shift))
    return recal


def _scale_rows(a: ScaleRows, recal: dict) -> None:
    mod, s, b = a.layer, a.scale, a.shift
    with torch.no_grad():
        shape = [-1] + [1] * (mod.weight.dim() - 1)
        mod.weight.mul_(s.view(shape))
        if mod.bias is not None:
            mod.bias.mul_(s)
        if b is not None:
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0]))
            mod.bias.add_(b)
    wq = getattr(mod, "weight_quant", None)
    if wq is not None and not _rescale_quantizer(wq, s):
        _reset(wq)
        recal[f"{a.path}.weight_quant"] = wq


def _scale_inputs(a: ScaleInputs, recal: dict) -> None:
    """``W'[:, c] = W[:, c]·s_c``, ``b' = b + Σ W[:, c, k]·b_c``."""
    mod, s, b = a.layer, a.scale, a.shift
    w = mod.weight
    if isinstance(mod, nn.Linear) and w.shape[1] != s.shape[0]:  # after flatten: c-major features
        rep = w.shape[1] // s.shape[0]
        s, b = s.repeat_interleave(rep), b.repeat_interleave(rep)
    with torch.no_grad():
        in_shape = [1, -1] + [1] * (w.dim() - 2)
        extra = (w.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w) @ b.to(w.dtype)
        w.mul_(s.view(in_shape))
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(w.shape[0]))
        mod.bias.add_(extra)
    for name in ("weight_quant", "act_quant"):
        q = getattr(mod, name, None)
        if q is not None:
            _reset(q)
            recal[f"{a.path}.{name}"] = q


def _into_batchnorm(bn: nn.Module, s: Tensor, b: Tensor) -> None:
    # γ'(h − μ)/σ + β' = γ(s h + b − μ)/σ + β  with γ' = γ s, β' = β + γ(b − μ + s μ)/σ (eval statistics)
    with torch.no_grad():
        sigma = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(sigma)
        new_beta = beta + gamma * (b - bn.running_mean + s * bn.running_mean) / sigma
        new_gamma = gamma * s
        bn.weight, bn.bias = nn.Parameter(new_gamma.clone()), nn.Parameter(new_beta.clone())


def _rescale_quantizer(q: nn.Module, s: Tensor) -> bool:
    """Scale a per-channel weight quantizer's range by s (exact). False if we don't know how."""
    if not getattr(q, "per_channel", False):
        return False
    done = False
    for t in range_tensors(q):
        if t.shape == s.shape:
            with torch.no_grad():
                t.mul_(s)
            done = True
    return done


def _reset(q: nn.Module) -> None:
    if callable(getattr(q, "reset", None)):
        q.reset()
    elif hasattr(q, "initialized"):  # a quantizer of the user's, without reset()
        q.initialized.fill_(False)


def recalibrate(model: nn.Module, quantizers: dict[str, nn.Module], batches: list[tuple]) -> None:
    """Re-initialize the quantizers whose input changed, then fit their range to it.

    A quantizer's own init (e.g. LSQ's 2·mean|x|/sqrt(Qp)) is meant to *start* QAT; after
    deploy we are at the end of it, so we also search a common factor on its range
    parameters that minimizes the quantization MSE on the calibration inputs.
    """
    if not quantizers:
        return
    seen: dict[str, list[Tensor]] = {name: [] for name in quantizers}
    hooks = [q.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach()))
             for name, q in quantizers.items()]
    with removing(hooks), torch.no_grad():
        for b in batches[:4]:
            model(*b)  # the first batch initializes them; all batches are recorded
    for name, q in quantizers.items():
        if seen[name]:
            _fit_range(q, seen[name][0] if name.endswith("weight_quant") else torch.cat(
                [x.flatten() for x in seen[name]]))


def _fit_range(q: nn.Module, x: Tensor) -> None:
    ranges = range_tensors(q)
    if not ranges:
        return
    original = [t.detach().clone() for t in ranges]
    was_training = q.training
    q.eval()
    best, best_m = float("inf"), 1.0
    with torch.no_grad():
        for m in torch.linspace(0.3, 2.0, 35).tolist():
            for t, o in zip(ranges, original):
                t.copy_(o * m)
            err = float((q(x) - x).pow(2).mean())
            if err < best:
                best, best_m = err, m
        for t, o in zip(ranges, original):
            t.copy_(o * best_m)
    q.train(was_training)
