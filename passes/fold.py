"""Deploy: freeze each GABFusion LayerNorm, fold α and the affine into convs, drop GABFusion.

After QAT a site computes ``y = LN(fuse(α_1·x_1, ..., α_K·x_K))``. Deployment (paper §Deployment):

1. **Freeze** the LayerNorm on calibration data: ``LN(h) ≈ A⊙h + B`` per channel.
   ``stats="fit"`` fits ``A_c, B_c`` per channel by least squares, the affine
   closest to the LayerNorm on that data. ``stats="ln"`` is the paper's formula: average
   the LayerNorm's own statistics, ``A = 1/sqrt(σ0² + ε)``, ``B = −μ0·A`` (μ0, σ0² the mean
   over positions of the per-position mean and variance). On the zoo models "fit" left a
   1.2-5× smaller deviation at the sites; but only the paper's channel-uniform affine passes a
   LayerNorm exactly, so ``stats="auto"`` (default) uses "ln" where a LayerNorm reads the site. With
   ``affine=True``, γ and β are folded in: ``A ← γ⊙A``, ``B ← γ⊙B + β``. The deviation
   this causes is measured at every site on the calibration data.
2. **Fold** the resulting per-branch affine — branch ``i`` is scaled by ``S_i = α_i·A``
   (``A`` sliced to the branch's channels for a cat) and the fused result shifted by ``B`` —
   exactly, trying in order:

   a. *the producers*: each branch walks back to the conv/linear that made it, through ops
      with ``f(s·x) = s·f(x)`` for ``s > 0`` (ReLU, LeakyReLU, max/avg pooling,
      nearest/bilinear upsampling). Rows of that layer: ``W'[o] = S_o·W[o]``,
      ``b'_o = S_o·b_o (+ B_o)``. The shift ``B`` only goes back where no nonlinearity
      stands between (for an add, one branch suffices). Every tensor on the walk must have
      no other user.
   b. *the consumers*, when every user of the site output is a conv/linear (groups=1) that
      reads the feature axis: ``W'[:, c] = W[:, c]·S_c``, ``b' = b + Σ_{c,k} W[:, c, k]·B_c``.
      The scale is exact for any kernel; the shift is exact for 1×1 or unpadded kernels and
      reported as approximate at zero-padded borders otherwise. For an add, only when all
      branch scales are equal.
   c. otherwise the site stays as an explicit, reported per-channel op (a frozen GABFusion).
3. Quantizers whose input changed are **re-calibrated** on a calibration batch: the act
   quantizer of every consumer fold, and weight quantizers of changed weights (a per-channel
   weight quantizer of a producer is rescaled exactly instead: step, min/max or clip bounds ×S).
4. Owners whose sites are all folded get their original class and forward back, so the
   deployed model has the original topology.

BatchNorm that follows a conv is folded first (the quantize pass already did it for QAT models).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fxfusion.gabfusion import GABFusion
from fxfusion.passes.calibrate import calibration_batches
from fxfusion.passes.find import leaves
from fxfusion.passes.quantize import _fold_batchnorms
from fxfusion.passes.rewrite import gabfusion_modules, restore_forward
from fxfusion.report import format_table

__all__ = ["DeployReport", "deploy", "freeze", "calibration_batches"]

_RANGE_NAMES = ("step", "running_min", "running_max", "upper", "lower")


@dataclass
class DeployReport:
    """Per site: the fold target, exactness, measured deviation, re-calibrated quantizers."""

    sites: list[dict] = field(default_factory=list)
    output_deviation: dict = field(default_factory=dict)
    bn_folded: list[str] = field(default_factory=list)
    recalibrated: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [format_table(self.sites, title=f"Deployed {len(self.sites)} GABFusion site(s)")]
        if self.output_deviation:
            parts.append(format_table([self.output_deviation], title="Model output vs the un-deployed model"))
        if self.recalibrated:
            parts.append(f"Re-calibrated quantizers ({len(self.recalibrated)}): " + ", ".join(self.recalibrated))
        return "\n\n".join(parts)

    def to_dict(self) -> dict:
        return {"sites": self.sites, "output_deviation": self.output_deviation, "bn_folded": self.bn_folded,
                "recalibrated": self.recalibrated}


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
        The deployed model, still trainable (fine-tune it briefly: the paper uses Adam,
        lr 2e-5). Its report is ``model.fxfusion_reports["deploy"]``.

    Example:
        >>> deployed = fxfusion.deploy(qat_model, val_loader)
        >>> print(deployed.fxfusion_reports["deploy"])
        >>> opt = torch.optim.Adam(deployed.parameters(), lr=2e-5)  # then your usual loop
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy expects a torch.nn.Module, got {type(model).__name__}")
    if stats not in ("auto", "ln", "fit"):
        raise ValueError(f"stats={stats!r} is not one of ('auto', 'ln', 'fit')")
    batches = calibration_batches(calib_data, max_batches)
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    report = DeployReport(bn_folded=_fold_batchnorms(model))
    reference = [_flat(_run(model, b)) for b in batches]
    graph = _analyse(model, batches[0])  # the dataflow does not change when the LayerNorms freeze
    fusions = gabfusion_modules(model)
    closed = _close_plain_sites(fusions)
    if stats == "auto":
        stats = {p: "ln" if _feeds_layernorm(p, m, graph) else "fit" for p, m in fusions.items()}
    freeze_stats = freeze(model, batches, stats=stats, inplace=True, progress=progress)
    freeze_stats.update({p: {"max": 0.0, "mean": 0.0} for p in closed})
    frozen = [_flat(_run(model, b)) for b in batches]

    to_recalibrate: dict[str, nn.Module] = {}
    pending: dict = {}
    for path in list(dict.fromkeys(graph.order)) + [p for p in fusions if p not in graph.order]:
        if path not in graph.site_out:
            outcome = {"target": "explicit per-channel op", "exact": True,
                       "note": "not executed by the calibration forward"}
            fusions[path].set_explicit(None, None)
        else:
            outcome = _fold_site(path, fusions[path], graph, pending, to_recalibrate)
        report.sites.append({"site": path, "op": fusions[path].op, **outcome,
                             "ln_max_dev": freeze_stats[path]["max"], "ln_mean_dev": freeze_stats[path]["mean"]})
    for owner in {p.rpartition(".")[0] for p in fusions}:  # all folded: original class and forward back
        owner_module = model.get_submodule(owner) if owner else model
        children = [n for n, m in owner_module.named_children() if isinstance(m, GABFusion)]
        if all(getattr(owner_module, n).norm == "none" for n in children) and restore_forward(owner_module):
            for n in children:
                delattr(owner_module, n)
    _recalibrate(model, to_recalibrate, batches)
    report.recalibrated = sorted(to_recalibrate)

    deployed = [_flat(_run(model, b)) for b in batches]
    if any(not torch.isfinite(t).all() for ts in deployed for t in ts) and all(
            torch.isfinite(t).all() for ts in reference for t in ts):
        raise RuntimeError("deploy produced non-finite outputs where the model had none; please report this "
                           "with the deploy report:\n" + str(report))
    report.output_deviation = {
        "max_vs_undeployed": _max_dev(reference, deployed), "mean_vs_undeployed": _mean_dev(reference, deployed),
        "max_vs_frozen_ln": _max_dev(frozen, deployed), "mean_vs_frozen_ln": _mean_dev(frozen, deployed),
        "batches": len(batches)}
    model.train(was_training)
    model.__dict__.setdefault("fxfusion_reports", {})["deploy"] = report
    return model


def freeze(model: nn.Module, batches: list[tuple], *, stats: str | dict[str, str] = "fit", inplace: bool = False,
           progress: bool = False) -> dict[str, dict]:
    """Replace every GABFusion LayerNorm by its calibrated per-channel affine.

    Returns per-site ``{"max", "mean"}`` deviation |LN(h) − (A⊙h + B)| on the batches.
    The model is changed in place (``inplace`` is accepted for symmetry and must be True).
    """
    assert inplace, "freeze edits the model in place"
    was_training = model.training
    model.eval()
    fusions = {p: m for p, m in gabfusion_modules(model).items() if _trains_a_norm(m)}
    acc = {p: _Stats(m) for p, m in fusions.items()}
    handles = [m.register_forward_hook(acc[p].observe) for p, m in fusions.items()]
    try:
        for b in _progress(batches, progress, "deploy: LayerNorm statistics"):
            _run(model, b)
    finally:
        for h in handles:
            h.remove()
    for p, m in fusions.items():
        m.freeze(*acc[p].affine(stats if isinstance(stats, str) else stats.get(p, "fit")))
    # measure the freeze on the same data
    for st in acc.values():
        st.measuring = True
    handles = [m.register_forward_hook(acc[p].observe) for p, m in fusions.items()]
    try:
        for b in batches:
            _run(model, b)
    finally:
        for h in handles:
            h.remove()
    model.train(was_training)
    return {p: {"max": st.dev_max, "mean": st.dev_sum / max(st.dev_n, 1)} for p, st in acc.items()}


def _trains_a_norm(m: GABFusion) -> bool:
    """A site whose output is not yet a fixed per-channel affine that deploy can fold as it is."""
    return m.norm in ("layernorm", "samplenorm") or (m.norm == "none" and m.weight is not None)


def _close_plain_sites(fusions: dict[str, GABFusion]) -> list[str]:
    """Sites whose gate is shut compute the plain fusion: make them the identity affine (nothing to fold)."""
    closed = [p for p, m in fusions.items() if m.gate_closed()]
    for p in closed:
        m = fusions[p]
        m.make_plain()
        ones = torch.ones(m.channels)
        m.freeze(ones, torch.zeros_like(ones))
    return closed


class _Stats:
    """Running sums for one site: LN statistics, per-channel fit, and the freeze deviation."""

    def __init__(self, m: GABFusion) -> None:
        self.m, self.measuring = m, False
        self.n = 0
        self.mu_sum = self.var_sum = 0.0
        self.sh = self.shh = self.sy = self.shy = None
        self.dev_max, self.dev_sum, self.dev_n = 0.0, 0.0, 0

    def observe(self, m: GABFusion, inputs: tuple, out: Tensor) -> None:
        xs = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)) else inputs
        with torch.no_grad():
            a = m.alpha()
            h = torch.cat([a[i] * x for i, x in enumerate(xs)], m.dim) if m.op == "cat" else sum(
                a[i] * x for i, x in enumerate(xs))
            h = h.movedim(m.dim, -1).reshape(-1, h.shape[m.dim]).double()
            if self.measuring:
                m.norm = m.train_norm
                try:
                    y_ln = m.forward(*xs)  # what the site computed before the freeze (no hooks)
                finally:
                    m.norm = "frozen"
                dev = (y_ln - out).abs()
                self.dev_max = max(self.dev_max, float(dev.max()))
                self.dev_sum += float(dev.sum())
                self.dev_n += dev.numel()
                return
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

    def affine(self, stats: str) -> tuple[Tensor, Tensor]:
        m, c = self.m, self.sh.shape[0]
        if getattr(m, "preserve", False):
            stats = "fit"  # its output blends the fusion and γ⊙LN + β: no plain LayerNorm
        mu0, var0 = self.mu_sum / self.n, self.var_sum / self.n
        if stats == "fit":
            mean_h, mean_y = self.sh / self.n, self.sy / self.n
            var_h = self.shh / self.n - mean_h ** 2
            cov = self.shy / self.n - mean_h * mean_y
            ln_scale = 1.0 / math.sqrt(var0 + m.eps)
            if m.weight is not None:
                ln_scale = ln_scale * m.weight.detach().double()
            fitted = cov / var_h.clamp_min(1e-12)
            # a constant channel fits any slope, and a slope <= 0 would break the folds through
            # ReLU: keep the LayerNorm's own (positive) scale there
            usable = (var_h > 1e-10 * (var_h.max() + 1e-30)) & (fitted > 0) & torch.isfinite(fitted)
            scale = torch.where(usable, fitted, torch.as_tensor(ln_scale, dtype=torch.float64).expand_as(fitted))
            return scale, mean_y - scale * mean_h
        a = torch.full((c,), 1.0 / math.sqrt(var0 + m.eps), dtype=torch.float64)
        b = -mu0 * a
        if m.weight is not None:
            g, beta = m.weight.detach().double(), m.bias.detach().double()
            a, b = g * a, g * b + beta
        return a, b


# --- the dataflow around each site, from one forward (quantizers off) ---------------------------

_BACK_OK = {  # autograd node -> the scale must be positive to commute with it
    "ReluBackward0": True, "LeakyReluBackward0": True, "MaxPool2DWithIndicesBackward0": True,
    "MaxPool1DWithIndicesBackward0": True, "AvgPool2DBackward0": False, "AvgPool1DBackward0": False,
    "UpsampleNearest2DBackward0": False, "UpsampleBilinear2DBackward0": False,
    "UpsampleNearest1DBackward0": False, "CloneBackward0": False,
}
# forward from a site we may also pass global pooling and the flatten before a classifier
_FORWARD_OK = {**_BACK_OK, "AdaptiveAvgPool2DBackward0": False, "MeanBackward1": False,
               "ViewBackward0": False, "ReshapeAliasBackward0": False, "UnsafeViewBackward0": False}
# max(x + b) = max(x) + b per channel (padding is -inf), and nearest upsampling copies values
_SHIFT_COMMUTES = {"UpsampleNearest2DBackward0", "UpsampleNearest1DBackward0", "CloneBackward0",
                   "MaxPool2DWithIndicesBackward0", "MaxPool1DWithIndicesBackward0", "AdaptiveAvgPool2DBackward0",
                   "MeanBackward1", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"}
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


@dataclass
class _Graph:
    out_of: dict = field(default_factory=dict)      # output grad_fn -> (path, conv/linear)
    readers: dict = field(default_factory=dict)     # input grad_fn -> [(path, layer)] reading it directly
    site_in: dict = field(default_factory=dict)     # site -> [grad_fn of each branch]
    site_out: dict = field(default_factory=dict)    # site -> grad_fn of its output
    sizes: dict = field(default_factory=dict)       # site -> [channels of each branch]
    order: list = field(default_factory=list)       # sites in execution order
    uses: dict = field(default_factory=dict)        # grad_fn -> number of uses (a model output is one)
    users: dict = field(default_factory=dict)       # grad_fn -> [user grad_fns]


def _analyse(model: nn.Module, batch: tuple) -> _Graph:
    g = _Graph()
    handles = []
    for path, m in model.named_modules():
        if isinstance(m, _LAYERS):
            def pre(mod, args, path=path) -> None:
                if args and isinstance(args[0], Tensor):
                    g.readers.setdefault(args[0].grad_fn, []).append((path, mod))

            handles.append(m.register_forward_pre_hook(pre))
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            def post(mod, args, out, path=path) -> None:
                g.out_of.setdefault(out.grad_fn, (path, mod))

            handles.append(m.register_forward_hook(post))
        if isinstance(m, GABFusion):
            def fpre(mod, args, path=path) -> None:
                xs = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
                g.site_in[path] = [x.grad_fn for x in xs]
                g.sizes[path] = [x.shape[mod.dim] for x in xs]
                g.order.append(path)

            def fpost(mod, args, out, path=path) -> None:
                g.site_out[path] = out.grad_fn

            handles += [m.register_forward_pre_hook(fpre), m.register_forward_hook(fpost)]
    quantizers = [m for m in model.modules() if hasattr(m, "qparams") and hasattr(m, "enabled")]
    states = [q.enabled for q in quantizers]
    try:
        for q in quantizers:
            q.enabled = False
        inputs = tuple(x.detach().clone().requires_grad_(True) if x.is_floating_point() else x for x in batch)
        with torch.enable_grad():
            outputs = model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for q, s in zip(quantizers, states):
            q.enabled = s
    roots = [t.grad_fn for t in leaves(outputs) if isinstance(t, Tensor) and t.grad_fn is not None]
    for r in roots:
        g.uses[r] = g.uses.get(r, 0) + 1
    seen, stack = set(), list(roots)
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                g.uses[nxt] = g.uses.get(nxt, 0) + 1
                g.users.setdefault(nxt, []).append(fn)
                stack.append(nxt)
    g._outputs = outputs  # keep the autograd graph (and its grad_fn ids) alive while planning
    return g


def _walk_back(fn, g: _Graph, positive: bool):
    """The conv/linear that made a branch, through positively homogeneous ops used by nothing else.

    Returns ``(path, layer, shift_ok)`` or the reason it cannot."""
    shift_ok = True
    while True:
        if fn is None:
            return "the branch has no autograd history (a model input or a constant, not a layer's output)"
        if g.uses.get(fn, 0) != 1:
            return f"{_op(fn)} output has {g.uses.get(fn, 0)} users"
        if fn in g.out_of:
            path, mod = g.out_of[fn]
            return path, mod, shift_ok
        name = type(fn).__name__
        if name not in _BACK_OK:
            return f"{_op(fn)} is not positively homogeneous"
        if _BACK_OK[name] and not positive:
            return f"{_op(fn)} needs a positive scale"
        shift_ok = shift_ok and name in _SHIFT_COMMUTES
        fn = fn.next_functions[0][0]


def _walk_forward(fn, g: _Graph, channels: int, positive: bool):
    """Everything that reads the site output, through homogeneous ops: layers and other sites.

    Returns ``[(kind, where, layer_or_branch, shift_ok)]`` or the reason some use can't absorb it."""
    found, frontier = [], [(fn, True, False)]
    while frontier:
        f, shift_ok, reshaped = frontier.pop()
        layers = g.readers.get(f, [])
        sites = [(p, j) for p, fns in g.site_in.items() for j, x in enumerate(fns) if x is f]
        passes = [u for u in g.users.get(f, []) if type(u).__name__ in _FORWARD_OK]
        if len(layers) + len(sites) + len(passes) != g.uses.get(f, 0):
            return (f"{_op(f)} output has {g.uses.get(f, 0)} use(s) of which {len(layers)} layer(s), "
                    f"{len(sites)} fusion(s), {len(passes)} pass-through op(s): the rest cannot absorb a scale")
        for path, mod in layers:
            why = _layer_refuses(mod, channels, not reshaped)
            if why:
                return f"{path}: {why}"
            found.append(("layer", path, mod, shift_ok))
        found += [("site", p, j, shift_ok) for p, j in sites]
        for u in passes:
            name = type(u).__name__
            if _FORWARD_OK[name] and not positive:
                return f"{_op(u)} needs a positive scale"
            frontier.append((u, shift_ok and name in _SHIFT_COMMUTES, reshaped or "View" in name or "Reshape" in name))
    return found


def _feeds_layernorm(path: str, m: GABFusion, g: _Graph) -> bool:
    """Does a LayerNorm read this site (directly or through pass-through ops)?"""
    if path not in g.site_out:
        return False
    channels = sum(g.sizes[path]) if m.op == "cat" else g.sizes[path][0]
    found = _walk_forward(g.site_out[path], g, channels, True)
    return not isinstance(found, str) and any(isinstance(x[2], nn.LayerNorm) for x in found)


def _layer_refuses(mod: nn.Module, channels: int, direct: bool) -> str:
    if isinstance(mod, nn.Linear):
        return "" if mod.in_features % channels == 0 else f"Linear in_features {mod.in_features} vs {channels} channels"
    if not direct:
        return f"{type(mod).__name__} reads a reshaped tensor"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return "" if mod.groups == 1 and mod.in_channels == channels else "grouped or mismatched conv"
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "" if mod.num_features == channels and mod.running_mean is not None else "BatchNorm without statistics"
    return "" if tuple(mod.normalized_shape) == (channels,) else "LayerNorm over more than the feature axis"


def _op(fn) -> str:
    return type(fn).__name__.replace("Backward0", "").replace("Backward1", "")


# --- folding one site ------------------------------------------------------------------------

def _fold_site(path: str, m: GABFusion, g: _Graph, pending: dict, recal: dict) -> dict:
    """Fold one frozen site given the scales its branches inherited from upstream folds."""
    scale, shift = (t.float() for t in m.frozen_affine())
    alpha = m.alpha().detach().float()
    c = scale.shape[0]
    sizes = g.sizes[path] if m.op == "cat" else [c] * m.num_branches
    a_parts = list(scale.split(sizes)) if m.op == "cat" else [scale] * m.num_branches
    s_in = [pending.get((path, i), (torch.ones(n), torch.zeros(n))) for i, n in enumerate(sizes)]
    if all(bool((alpha[i] * a_parts[i] * p == 1).all() and (q == 0).all()) for i, (p, q) in enumerate(s_in)) \
            and bool((shift == 0).all()):  # the identity (a gate closed at the end of QAT): change nothing
        m.make_plain()
        return {"target": "nothing to fold (the site computes the original fusion)", "exact": True, "note": ""}
    # y = A ⊙ fuse(α_i (p_i ⊙ x_i + q_i)) + B  ==  fuse(S_i ⊙ x_i) + B'
    branch = [alpha[i] * a_parts[i] * s_in[i][0] for i in range(m.num_branches)]
    extra = [alpha[i] * a_parts[i] * s_in[i][1] for i in range(m.num_branches)]
    shift = shift + (torch.cat(extra) if m.op == "cat" else sum(extra))
    positive = all(bool((s > 0).all()) for s in branch)
    back = [_walk_back(fn, g, positive) for fn in g.site_in[path]]
    forward = _walk_forward(g.site_out[path], g, c, positive)
    ok = [i for i, b in enumerate(back) if not isinstance(b, str)]
    why_back = "; ".join(f"branch {i}: {b}" for i, b in enumerate(back) if isinstance(b, str))
    why_fwd = forward if isinstance(forward, str) else ""

    def shift_to_producer(i: int, b: Tensor) -> bool:
        return i in ok and back[i][2] and b is not None

    if len(ok) == m.num_branches:  # every branch has its own producer: scale goes there
        if m.op == "cat" and all(back[i][2] for i in ok):
            for i, part in zip(ok, shift.split(sizes)):
                _scale_rows(back[i], branch[i], part, recal)
            return _done(m, "producers", back, True, "")
        k = next((i for i in ok if back[i][2]), None) if m.op == "add" else None
        for i in ok:
            _scale_rows(back[i], branch[i], shift if i == k else None, recal)
        if k is not None:
            return _done(m, "producers", back, True, "")
        if not why_fwd and all(x[3] for x in forward) and not _layernorm_refuses(forward, None, shift, m.op):
            exact = _to_consumers(forward, torch.ones(c), shift, pending, recal)
            return _done(m, "producers; shift -> consumers", back, exact, "")
        m.set_explicit([torch.ones(n) for n in sizes], shift)
        return {"target": "producers; shift kept explicit", "exact": True,
                "note": "the shift has no linear path: " + (why_fwd or "passes a nonlinearity")}
    if not why_fwd:
        why_fwd = _layernorm_refuses(forward, branch, shift, m.op)
    if not why_fwd:
        if m.op == "cat":
            common, rest = torch.cat(branch), {}
        else:  # one reference branch k carries the common scale; the others get S_i / S_k
            k = next(i for i in range(m.num_branches) if i not in ok)
            common, rest = branch[k], {i: branch[i] / branch[k] for i in range(m.num_branches) if i != k}
            if any(i not in ok for i in rest) or not all(bool((r > 0).all() and torch.isfinite(r).all())
                                                         for r in rest.values()):
                common = None
        if common is not None:
            where = "consumers" + (" (ratios -> producers)" if rest else "")
            k_shift = next((i for i in rest if back[i][2]), None)
            if k_shift is not None:  # y = S_k ⊙ (Σ R_i x_i + B / S_k): the shift rides on one producer, exactly
                for i, r in rest.items():
                    _scale_rows(back[i], r, shift / common if i == k_shift else None, recal)
                exact = _to_consumers(forward, common, torch.zeros_like(shift), pending, recal)
                return _done(m, where + "; shift -> producer", forward, exact, "")
            if all(x[3] for x in forward):
                for i, r in rest.items():
                    _scale_rows(back[i], r, None, recal)
                exact = _to_consumers(forward, common, shift, pending, recal)
                return _done(m, where, forward, exact, "" if exact else
                             "shift approximate at zero-padded borders (deviation measured)")
    m.set_explicit(branch, shift)
    return {"target": "explicit per-channel op", "exact": True,
            "note": "; ".join(x for x in (why_back, why_fwd) if x) or "shift has no linear path"}


def _layernorm_refuses(forward: list, branch: list | None, shift: Tensor, op: str) -> str:
    """LN(s⊙h + b) = LN(h) only for a channel-uniform s > 0 and b: check before changing anything."""
    if not any(isinstance(x[2], nn.LayerNorm) for x in forward if not isinstance(x, str)):
        return ""
    scales = [] if branch is None else ([torch.cat(branch)] if op == "cat" else branch)
    uniform = all(torch.allclose(v, v.flatten()[0].expand_as(v)) for v in [*scales, shift])
    return "" if uniform else "a LayerNorm reads the site and the affine is not channel-uniform (try stats='ln')"


def _done(m: GABFusion, target: str, where: list, exact: bool, note: str) -> dict:
    names = [w[0] if len(w) == 3 else w[1] for w in where if not isinstance(w, str)]
    m.make_plain()
    return {"target": f"{target} ({', '.join(map(str, names))})", "exact": exact, "note": note}


def _to_consumers(forward: list, s: Tensor, b: Tensor, pending: dict, recal: dict) -> bool:
    """Apply ``y = s ⊙ h + b`` to every reader of h. True when every fold is exact."""
    exact = True
    for kind, where, target, _ in forward:
        if kind == "site":
            p, q = pending.get((where, target), (torch.ones_like(s), torch.zeros_like(s)))
            pending[(where, target)] = (p * s, p * b + q)
            continue
        mod = target
        if isinstance(mod, nn.LayerNorm):
            exact &= _into_layernorm(mod, s, b)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            _into_batchnorm(mod, s, b)
        else:
            exact &= _scale_inputs(mod, s, b, recal, where)
    return exact


def _into_batchnorm(bn: nn.Module, s: Tensor, b: Tensor) -> None:
    # γ'(h − μ)/σ + β' = γ(s h + b − μ)/σ + β  with γ' = γ s, β' = β + γ(b − μ + s μ)/σ (eval statistics)
    with torch.no_grad():
        sigma = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(sigma)
        new_beta = beta + gamma * (b - bn.running_mean + s * bn.running_mean) / sigma
        new_gamma = gamma * s
        bn.weight, bn.bias = nn.Parameter(new_gamma.clone()), nn.Parameter(new_beta.clone())


def _into_layernorm(ln: nn.LayerNorm, s: Tensor, b: Tensor) -> bool:
    # LN(s h + b) = LN(h) for a uniform s > 0 and b (checked by _layernorm_refuses), once ε is divided by s².
    ln.eps = ln.eps / float(s[0]) ** 2
    return True


def _scale_rows(producer: tuple, s: Tensor, b: Tensor | None, recal: dict) -> None:
    path, mod, _ = producer
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
        recal[f"{path}.weight_quant"] = wq


def _scale_inputs(mod: nn.Module, s: Tensor, b: Tensor, recal: dict, path: str) -> bool:
    """``W'[:, c] = W[:, c]·s_c``, ``b' = b + Σ W[:, c, k]·b_c``; exact unless a padded kernel takes a shift."""
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
            recal[f"{path}.{name}"] = q
    return bool((b == 0).all()) or isinstance(mod, nn.Linear) or _shift_exact(mod)


def _shift_exact(mod: nn.Module) -> bool:
    p = mod.padding
    pads = (1,) if isinstance(p, str) and p != "valid" else (0,) if isinstance(p, str) else p
    return all(k == 1 for k in mod.kernel_size) or all(x == 0 for x in pads)


def _rescale_quantizer(q: nn.Module, s: Tensor) -> bool:
    """Scale a per-channel weight quantizer's range by s (exact). False if we don't know how."""
    if not getattr(q, "per_channel", False):
        return False
    done = False
    for name in _RANGE_NAMES:
        t = getattr(q, name, None)
        if isinstance(t, Tensor) and t.shape == s.shape:
            with torch.no_grad():
                t.mul_(s)
            done = True
    return done


def _reset(q: nn.Module) -> None:
    if hasattr(q, "initialized"):
        q.initialized.fill_(False)


def _recalibrate(model: nn.Module, quantizers: dict, batches: list[tuple]) -> None:
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
    try:
        for b in batches[:4]:
            _run(model, b)  # the first batch initializes them; all batches are recorded
    finally:
        for h in hooks:
            h.remove()
    for name, q in quantizers.items():
        if seen[name]:
            _fit_range(q, seen[name][0] if name.endswith("weight_quant") else torch.cat(
                [x.flatten() for x in seen[name]]))


def _fit_range(q: nn.Module, x: Tensor) -> None:
    ranges = [getattr(q, n) for n in _range_names(q) if isinstance(getattr(q, n, None), Tensor)]
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


def _range_names(q: nn.Module) -> tuple[str, ...]:
    """Parameters that scale a quantizer's grid as a whole (names of the built-in quantizers)."""
    names = {"PACTQuantizer": ("alpha", "beta", "running_min", "running_max"),
             "N2UQQuantizer": ("start", "widths", "step")}
    return names.get(type(q).__name__, _RANGE_NAMES)


# --- helpers --------------------------------------------------------------------------------

def _run(model: nn.Module, batch: tuple):
    with torch.no_grad():
        return model(*batch)


def _flat(out) -> list[Tensor]:
    return [t.detach().float() for t in leaves(out) if isinstance(t, Tensor)]


def _max_dev(a: list[list[Tensor]], b: list[list[Tensor]]) -> float:
    return max(float((x - y).abs().max()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _mean_dev(a: list[list[Tensor]], b: list[list[Tensor]]) -> float:
    total = sum(float((x - y).abs().sum()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    count = sum(x.numel() for xs in a for x in xs)
    return total / max(count, 1)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)
