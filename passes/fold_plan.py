"""Deploy, step 2: decide how each frozen site folds, without changing the model.

A frozen site computes ``y = fuse(S_1⊙x_1, ..., S_K⊙x_K) + B`` (:mod:`~fxfusion.passes.freeze`;
``S_i = α_i·A`` sliced to the branch for a cat). Folding moves ``S`` and ``B`` into neighbouring
layers so that the site becomes the bare op again. For each site, in execution order, the plan
tries:

a. *the producers*: each branch walks back to the conv/linear that made it, through ops with
   ``f(s·x) = s·f(x)`` (for ``s > 0`` where :data:`~fxfusion.passes.dataflow.OPS` says so: ReLU,
   max pooling). Rows of that layer take the scale: ``W'[o] = S_o·W[o]``, ``b'_o = S_o·b_o (+ B_o)``.
   The shift goes back only where every op on the way commutes with it (for an add, one branch
   suffices). Every tensor on the walk must have no other user.
b. *the consumers*, when every use of the site output is a conv/linear (groups=1) reading the
   feature axis, a BatchNorm, a LayerNorm (channel-uniform affine only) or another site:
   ``W'[:, c] = W[:, c]·S_c``, ``b' = b + Σ_{c,k} W[:, c, k]·B_c``. The scale is exact for any
   kernel; the shift is exact for 1×1 or unpadded kernels and reported approximate otherwise. For
   an add, a common scale goes to the consumers and the branch ratios to the producers.
c. otherwise the site stays an explicit per-channel op, with the reason.

The result is a list of :class:`SiteFold` decisions, each either exact, approximate (with its
note) or explicit (with its reason), carrying the :data:`Action` list that
:mod:`~fxfusion.passes.fold_apply` performs. A consumer fold into a later site's branch is carried
in the plan (``pending``), so the later site folds what it inherited.

The dataflow comes from one forward with quantizers off (:func:`analyse`): autograd nodes tell
which layer made each tensor and who reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion, branches
from fxfusion.passes.dataflow import PRODUCERS, READERS, grad_fn_facts, grad_fn_name
from fxfusion.passes.runtime import removing, set_submodule, tensors, tracked
from fxfusion.quant import is_quantizer

__all__ = ["Action", "Dataflow", "IntoBatchNorm", "IntoLayerNorm", "ScaleInputs", "ScaleRows", "SiteFold",
           "analyse", "feeds_layernorm", "plan"]


# --- the typed decisions ---------------------------------------------------------------------

@dataclass
class ScaleRows:
    """A producer takes ``s`` on its output rows (and ``b`` on its bias)."""

    path: str
    layer: nn.Module
    scale: Tensor
    shift: Tensor | None


@dataclass
class ScaleInputs:
    """A conv/linear reading the site takes ``s`` on its input columns and ``W·b`` on its bias."""

    path: str
    layer: nn.Module
    scale: Tensor
    shift: Tensor


@dataclass
class IntoBatchNorm:
    """A BatchNorm reading the site absorbs ``s⊙h + b`` into γ, β (eval statistics)."""

    path: str
    layer: nn.Module
    scale: Tensor
    shift: Tensor


@dataclass
class IntoLayerNorm:
    """A LayerNorm absorbs a channel-uniform ``s > 0`` and ``b``: only its ε changes."""

    path: str
    layer: nn.Module
    scale: Tensor


Action = ScaleRows | ScaleInputs | IntoBatchNorm | IntoLayerNorm


@dataclass
class SiteFold:
    """The decision for one site.

    ``explicit`` is None when the site becomes the bare op; otherwise the ``(scales, shift)`` it
    keeps as an explicit per-channel op (``keep=True``: keep the frozen module as it is).
    """

    site: str
    op: str
    target: str
    exact: bool
    note: str = ""
    actions: list[Action] = field(default_factory=list)
    explicit: tuple[list[Tensor] | None, Tensor | None] | None = None
    keep: bool = False

    @property
    def folded(self) -> bool:
        return self.explicit is None and not self.keep

    def row(self) -> dict:
        return {"site": self.site, "op": self.op, "target": self.target, "exact": self.exact, "note": self.note}


# --- the dataflow around each site, from one forward (quantizers off) ---------------------------

@dataclass
class Dataflow:
    out_of: dict = field(default_factory=dict)      # output grad_fn -> (path, conv/linear)
    readers: dict = field(default_factory=dict)     # input grad_fn -> [(path, layer)] reading it directly
    site_in: dict = field(default_factory=dict)     # site -> [grad_fn of each branch]
    site_readers: dict = field(default_factory=dict)  # grad_fn -> [(site, branch index)] reading it
    site_out: dict = field(default_factory=dict)    # site -> grad_fn of its output
    sizes: dict = field(default_factory=dict)       # site -> [channels of each branch]
    ops: dict = field(default_factory=dict)         # site -> "cat" or "add"
    order: list = field(default_factory=list)       # sites in execution order
    uses: dict = field(default_factory=dict)        # grad_fn -> number of uses (a model output is one)
    users: dict = field(default_factory=dict)       # grad_fn -> [user grad_fns]
    outputs: object = None                          # keeps the autograd graph (and grad_fn ids) alive


def analyse(model: nn.Module, batch: tuple) -> Dataflow:
    """Record, from one forward on ``batch``, who makes and who reads each tensor around the sites.

    The forward runs with quantizers off and every training site as its bare op (put back after):
    the dataflow is the same, and a gated site would use each branch twice (plain and normalized
    path), which would hide every producer and every reader behind it.
    """
    training = {p: m for p, m in model.named_modules() if isinstance(m, GABFusion)}
    for p, m in training.items():
        set_submodule(model, p, DeployedFusion.bare(m))
    try:
        return _analyse(model, batch)
    finally:
        for p, m in training.items():
            set_submodule(model, p, m)


def _analyse(model: nn.Module, batch: tuple) -> Dataflow:
    g = Dataflow()
    handles = []
    for path, m in model.named_modules():
        if isinstance(m, READERS):
            def pre(mod, args, path=path) -> None:
                if args and isinstance(args[0], Tensor):
                    g.readers.setdefault(args[0].grad_fn, []).append((path, mod))

            handles.append(m.register_forward_pre_hook(pre))
        if isinstance(m, PRODUCERS):
            def post(mod, args, out, path=path) -> None:
                g.out_of.setdefault(out.grad_fn, (path, mod))

            handles.append(m.register_forward_hook(post))
        if isinstance(m, (GABFusion, DeployedFusion)):
            def fpre(mod, args, path=path) -> None:
                xs = branches(args)
                g.site_in[path] = [x.grad_fn for x in xs]
                for j, x in enumerate(xs):
                    g.site_readers.setdefault(x.grad_fn, []).append((path, j))
                g.sizes[path] = [x.shape[mod.dim] for x in xs]
                g.ops[path] = mod.op
                g.order.append(path)

            def fpost(mod, args, out, path=path) -> None:
                g.site_out[path] = out.grad_fn

            handles += [m.register_forward_pre_hook(fpre), m.register_forward_hook(fpost)]
    quantizers = [m for m in model.modules() if is_quantizer(m)]
    states = [q.enabled for q in quantizers]
    try:
        for q in quantizers:
            q.enabled = False
        with removing(handles), torch.enable_grad():
            g.outputs = model(*tracked(batch))
    finally:
        for q, s in zip(quantizers, states):
            q.enabled = s
    roots = [t.grad_fn for t in tensors(g.outputs) if t.grad_fn is not None]
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
    return g


def _walk_back(fn, g: Dataflow, positive: bool):
    """The conv/linear that made a branch, through scale-commuting ops used by nothing else.

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
        facts = grad_fn_facts(fn)
        if facts is None or facts.scale is None or facts.forward_only:
            return f"{_op(fn)} is not positively homogeneous"
        if facts.scale == "positive" and not positive:
            return f"{_op(fn)} needs a positive scale"
        shift_ok = shift_ok and facts.shift
        fn = fn.next_functions[0][0]


def _walk_forward(fn, g: Dataflow, channels: int, positive: bool):
    """Everything that reads the site output, through scale-commuting ops: layers and other sites.

    Returns ``[(kind, where, layer_or_branch, shift_ok)]`` or the reason some use can't absorb it."""
    found, frontier = [], [(fn, True, False)]
    while frontier:
        f, shift_ok, reshaped = frontier.pop()
        layers = g.readers.get(f, [])
        sites = g.site_readers.get(f, [])
        passes = [(u, facts) for u in g.users.get(f, [])
                  if (facts := grad_fn_facts(u)) is not None and facts.scale is not None]
        if len(layers) + len(sites) + len(passes) != g.uses.get(f, 0):
            return (f"{_op(f)} output has {g.uses.get(f, 0)} use(s) of which {len(layers)} layer(s), "
                    f"{len(sites)} fusion(s), {len(passes)} pass-through op(s): the rest cannot absorb a scale")
        for path, mod in layers:
            why = _layer_refuses(mod, channels, not reshaped)
            if why:
                return f"{path}: {why}"
            found.append(("layer", path, mod, shift_ok))
        found += [("site", p, j, shift_ok) for p, j in sites]
        for u, facts in passes:
            if facts.scale == "positive" and not positive:
                return f"{_op(u)} needs a positive scale"
            frontier.append((u, shift_ok and facts.shift, reshaped or facts.reshapes))
    return found


def feeds_layernorm(path: str, g: Dataflow) -> bool:
    """Does a LayerNorm read this site (directly or through pass-through ops)?"""
    if path not in g.site_out:
        return False
    found = _walk_forward(g.site_out[path], g, _channels(path, g), True)
    return not isinstance(found, str) and any(isinstance(x[2], nn.LayerNorm) for x in found)


def _channels(path: str, g: Dataflow) -> int:
    """Width of a site's output along its feature axis (a cat's widths add up; an add's are equal)."""
    sizes = g.sizes[path]
    return sum(sizes) if g.ops[path] == "cat" else sizes[0]


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
    return grad_fn_name(fn)


# --- deciding one site --------------------------------------------------------------------------

def plan(sites: dict[str, DeployedFusion], g: Dataflow) -> list[SiteFold]:
    """Decide every frozen site, in execution order; the model is not changed."""
    pending: dict = {}  # (site, branch) -> (p, q): a consumer fold upstream left p⊙x + q on that branch
    decisions = []
    for path in list(dict.fromkeys(g.order)) + [p for p in sites if p not in g.order]:
        if path not in g.site_out:
            decisions.append(SiteFold(path, sites[path].op, "explicit per-channel op", True,
                                      "not executed by the calibration forward", keep=True))
        else:
            decisions.append(_plan_site(path, sites[path], g, pending))
    return decisions


def _plan_site(path: str, m: DeployedFusion, g: Dataflow, pending: dict) -> SiteFold:
    """Fold ``y = fuse(S_i ⊙ (p_i ⊙ x_i + q_i)) + B`` (p, q inherited from upstream folds)."""
    k_branches, sizes, c = m.num_branches, g.sizes[path], _channels(path, g)
    own = m.branch_scales() or [torch.ones(n if m.op == "cat" else c) for n in sizes]
    shift = m.shift.float() if m.shift is not None else torch.zeros(c)
    s_in = [pending.get((path, i), (torch.ones(n), torch.zeros(n))) for i, n in enumerate(sizes)]
    fold = SiteFold(path, m.op, "", True)
    if all(bool((own[i] * p == 1).all() and (q == 0).all()) for i, (p, q) in enumerate(s_in)) \
            and bool((shift == 0).all()):  # the identity (a gate closed at the end of QAT): change nothing
        fold.target = "nothing to fold (the site computes the original fusion)"
        return fold
    # y = fuse(S_i ⊙ (p_i ⊙ x_i + q_i)) + B  ==  fuse(S'_i ⊙ x_i) + B'
    branch = [own[i] * s_in[i][0] for i in range(k_branches)]
    extra = [own[i] * s_in[i][1] for i in range(k_branches)]
    shift = shift + (torch.cat(extra) if m.op == "cat" else sum(extra))
    positive = all(bool((s > 0).all()) for s in branch)
    back = [_walk_back(fn, g, positive) for fn in g.site_in[path]]
    forward = _walk_forward(g.site_out[path], g, c, positive)
    ok = [i for i, b in enumerate(back) if not isinstance(b, str)]
    why_back = "; ".join(f"branch {i}: {b}" for i, b in enumerate(back) if isinstance(b, str))
    why_fwd = forward if isinstance(forward, str) else ""

    def rows(i: int, s: Tensor, b: Tensor | None) -> None:
        fold.actions.append(ScaleRows(back[i][0], back[i][1], s, b))

    if len(ok) == k_branches:  # every branch has its own producer: the scale goes there
        if m.op == "cat" and all(back[i][2] for i in ok):
            for i, part in zip(ok, shift.split(sizes)):
                rows(i, branch[i], part)
            return _folded(fold, "producers", back, True)
        k = next((i for i in ok if back[i][2]), None) if m.op == "add" else None
        for i in ok:
            rows(i, branch[i], shift if i == k else None)
        if k is not None:
            return _folded(fold, "producers", back, True)
        if not why_fwd and all(x[3] for x in forward) and not _layernorm_refuses(forward, None, shift, m.op):
            exact = _to_consumers(fold, forward, torch.ones(c), shift, pending)
            return _folded(fold, "producers; shift -> consumers", back, exact)
        fold.target, fold.explicit = "producers; shift kept explicit", (None, shift)
        fold.note = "the shift has no linear path: " + (why_fwd or "passes a nonlinearity")
        return fold
    if not why_fwd:
        why_fwd = _layernorm_refuses(forward, branch, shift, m.op)
    if not why_fwd:
        if m.op == "cat":
            common, rest = torch.cat(branch), {}
        else:  # one reference branch k carries the common scale; the others get S_i / S_k
            k = next(i for i in range(k_branches) if i not in ok)
            common, rest = branch[k], {i: branch[i] / branch[k] for i in range(k_branches) if i != k}
            if any(i not in ok for i in rest) or not all(bool((r > 0).all() and torch.isfinite(r).all())
                                                         for r in rest.values()):
                common = None
        if common is not None:
            where = "consumers" + (" (ratios -> producers)" if rest else "")
            k_shift = next((i for i in rest if back[i][2]), None)
            if k_shift is not None:  # y = S_k ⊙ (Σ R_i x_i + B / S_k): the shift rides on one producer, exactly
                for i, r in rest.items():
                    rows(i, r, shift / common if i == k_shift else None)
                exact = _to_consumers(fold, forward, common, torch.zeros_like(shift), pending)
                return _folded(fold, where + "; shift -> producer", forward, exact)
            if all(x[3] for x in forward):
                for i, r in rest.items():
                    rows(i, r, None)
                exact = _to_consumers(fold, forward, common, shift, pending)
                return _folded(fold, where, forward, exact,
                               "" if exact else "shift approximate at zero-padded borders (deviation measured)")
    fold.actions.clear()
    fold.target, fold.explicit = "explicit per-channel op", (branch, shift)
    fold.note = "; ".join(x for x in (why_back, why_fwd) if x) or "shift has no linear path"
    return fold


def _folded(fold: SiteFold, target: str, where: list, exact: bool, note: str = "") -> SiteFold:
    names = [w[0] if len(w) == 3 else w[1] for w in where if not isinstance(w, str)]
    fold.target, fold.exact, fold.note = f"{target} ({', '.join(map(str, names))})", exact, note
    return fold


def _layernorm_refuses(forward: list, branch: list | None, shift: Tensor, op: str) -> str:
    """LN(s⊙h + b) = LN(h) only for a channel-uniform s > 0 and b: check before changing anything."""
    if not any(isinstance(x[2], nn.LayerNorm) for x in forward if not isinstance(x, str)):
        return ""
    scales = [] if branch is None else ([torch.cat(branch)] if op == "cat" else branch)
    uniform = all(torch.allclose(v, v.flatten()[0].expand_as(v)) for v in [*scales, shift])
    return "" if uniform else "a LayerNorm reads the site and the affine is not channel-uniform (try stats='ln')"


def _to_consumers(fold: SiteFold, forward: list, s: Tensor, b: Tensor, pending: dict) -> bool:
    """Plan ``y = s ⊙ h + b`` into every reader of h. True when every fold is exact."""
    exact = True
    for kind, where, target, _ in forward:
        if kind == "site":
            p, q = pending.get((where, target), (torch.ones_like(s), torch.zeros_like(s)))
            pending[(where, target)] = (p * s, p * b + q)
        elif isinstance(target, nn.LayerNorm):
            fold.actions.append(IntoLayerNorm(where, target, s))
        elif isinstance(target, (nn.BatchNorm1d, nn.BatchNorm2d)):
            fold.actions.append(IntoBatchNorm(where, target, s, b))
        else:
            fold.actions.append(ScaleInputs(where, target, s, b))
            exact &= bool((b == 0).all()) or isinstance(target, nn.Linear) or _shift_exact(target)
    return exact


def _shift_exact(mod: nn.Module) -> bool:
    """A shift on a conv's input folds into its bias exactly unless zero padding meets it."""
    p = mod.padding
    pads = (1,) if isinstance(p, str) and p != "valid" else (0,) if isinstance(p, str) else p
    return all(k == 1 for k in mod.kernel_size) or all(x == 0 for x in pads)
