"""The GABFusion rewrite: each fusion site becomes ``LN(fuse(α_1·x_1, ..., α_K·x_K))``.

Before (a YOLO ``Concat``)::

    def forward(self, x):
        return torch.cat(x, self.d)

After::

    def forward(self, x):
        return self.gabfusion0(x)          # GABFusion("cat", K, dim=self.d)

Only the *owner* of each site (the module whose own forward fuses) is edited, so the
rest of the model, and the root class, stay as they are. The owner keeps its object,
its class (a subclass named like the original with the rewritten forward), every
attribute (YOLO routes on ``m.f``/``m.i``), its children and its parameter names, so
``rewritten.load_state_dict(original.state_dict(), strict=False)`` loads everything and
reports only the new α keys as missing. :func:`restore_forward` undoes it (deploy uses it).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch.fx as fx
from torch import Tensor, nn
from torch.fx.graph_module import _format_import_block
from torch.package import sys_importer

from fxfusion.gabfusion import ALPHA_MODES, NORMS, GABFusion
from fxfusion.passes.calibrate import calibrate_sites, calibration_batches
from fxfusion.passes.find import FusionReport, FusionSite, Refusal, find_fusions, fusion_kind, fusion_ordinals
from fxfusion.passes.foldability import FOLDS, predict_folds, verdict
from fxfusion.passes.runtime import failure_reason, network, normalize_inputs, paused_gc
from fxfusion.passes.trace import shallow_trace
from fxfusion.quant.layers import is_quantized
from fxfusion.report import format_table

__all__ = ["INITS", "RewriteReport", "rewrite", "restore_forward", "gabfusion_modules"]

INITS = ("preserve", "paper")


class RewriteReport:
    """What :func:`rewrite` did: the GABFusion module placed at each site, and what it left."""

    def __init__(self, placed: list[dict], refused: list[Refusal], found: FusionReport) -> None:
        self.placed, self.refused, self.found = placed, refused, found

    def __str__(self) -> str:
        parts = [format_table(self.placed, title=f"GABFusion placed at {len(self.placed)} site(s)")]
        if self.refused:
            parts.append(format_table([vars(r) for r in self.refused], title="Not rewritten"))
        if self.found.untraceable:
            parts.append(format_table([vars(u) for u in self.found.untraceable],
                                      title="Untraceable modules (not examined)"))
        return "\n\n".join(parts)

    def to_dict(self) -> dict:
        return {"placed": self.placed, "refused": self.refused, "untraceable": self.found.untraceable}


@paused_gc()
def rewrite(
    model: nn.Module,
    example_inputs: Tensor | Sequence | None = None,
    *,
    sites: FusionReport | Iterable[FusionSite] | None = None,
    init: str = "preserve",
    calib_data: Iterable | None = None,
    alpha: str = "learned",
    alpha_init: float = 0.5,
    norm: str = "layernorm",
    affine: bool = False,
    eps: float = 1e-5,
    fold: str = "exact",
    inplace: bool = False,
    concrete_args: dict | None = None,
    leaf_types: Iterable[type] = (),
) -> nn.Module:
    """Put a GABFusion subgraph at every fusion site of ``model``, ready for QAT.

    Args:
        model: any ``nn.Module``.
        example_inputs: inputs for site discovery (omit when passing ``sites``).
        sites: the sites to rewrite, e.g. a filtered :func:`find_fusions` report.
        init: ``"preserve"`` (default): every site starts as the gated form of
            :class:`~fxfusion.GABFusion` with its gate closed, where it is the original fusion op
            bit for bit, so the rewritten model computes what ``model`` computed; open (and close)
            the gate during QAT with :class:`fxfusion.NormSchedule`.
            ``"paper"``: the paper's plain ``LN(fuse(α·x))``, which changes the model's outputs
            (re-estimate BatchNorm statistics before QAT if you use it on a trained model).
        calib_data: batches (a DataLoader of ``(inputs, targets)`` works) on which
            ``init="preserve"`` measures each site's per-channel statistics (default: the
            example inputs). They decide how closely the normalized form matches the original
            once the gate opens, not the exactness at the start.
        alpha: ``"learned"`` (paper v1), ``"balanced"`` (paper v2, drive it with
            :class:`fxfusion.AlphaBalancer`) or ``"fixed"``.
        alpha_init: the initial α (0.5 in the paper).
        norm: ``"layernorm"`` (default: per position across channels, the paper's axis),
            ``"samplenorm"`` (per sample over channels and positions) or ``"none"`` (α only).
        affine, eps: the LayerNorm's options.
        fold: which sites to place, by how deploy would fold them if their gate is still open then
            (:mod:`~fxfusion.passes.foldability`; checked on the example inputs or the first
            calibration batch): ``"exact"`` (default: only sites deploy folds exactly, so the
            deployed model has the original topology and computes what the trained one did),
            ``"approximate"`` (also sites folded with a measured approximation at zero-padded
            borders) or ``"any"`` (every site; one without an exact fold stays an explicit
            per-channel op after deploy). The others are listed in the report with the reason.
        inplace: edit ``model`` itself instead of a deep copy.

    Returns:
        The rewritten model (same root object when ``inplace``). Its report is in
        ``model.fxfusion_reports["rewrite"]``; with ``init="preserve"`` it lists, per site, the
        largest deviation from the original fusion now and the relative L2 deviation the site
        will show with the gate fully open.

    Example:
        >>> from fxfusion.zoo import build
        >>> model = build("resnet").eval()
        >>> rewritten = fxfusion.rewrite(model, x)
        >>> placed = rewritten.fxfusion_reports["rewrite"].placed
        >>> placed[0]["op"], placed[0]["max |Δ| now"]
        ('add', '0')
        >>> torch.equal(rewritten.eval()(x), model(x))  # function-preserving until the gate opens
        True
    """
    model = network(model, "rewrite", edits=True)
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha={alpha!r} is not one of {ALPHA_MODES}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    quantized = [n for n, m in model.named_modules() if is_quantized(m)]
    if quantized:
        raise ValueError(f"{type(model).__name__} is already quantized (e.g. {quantized[0]!r}): rewrite first, "
                         "then quantize: fxfusion.quantize(fxfusion.rewrite(model, x), x, ...)")
    if sites is None:
        if example_inputs is None:
            raise TypeError("rewrite needs example_inputs (to find the sites) or sites= from find_fusions")
        found = find_fusions(model, example_inputs, concrete_args=concrete_args, leaf_types=leaf_types)
    else:
        found = sites if isinstance(sites, FusionReport) else FusionReport(sites=list(sites))
    if fold not in FOLDS:
        raise ValueError(f"fold={fold!r} is not one of {tuple(FOLDS)}")
    if not inplace:
        model = copy.deepcopy(model)

    options = dict(alpha=alpha, alpha_init=alpha_init, norm=norm, affine=affine, eps=eps,
                   preserve=init == "preserve")
    batch = _first_batch(calib_data, example_inputs)
    placed, refused, folds = _place_foldable(model, found.sites, fold, batch, options, leaf_types,
                                             found.conv_bn)
    for row in placed:
        row["deploy"] = folds.get(row["site"], "not checked")

    if not placed:
        why = [f"{len(refused)} refused, see the report"] if refused else []
        if found.untraceable:  # e.g. data-dependent control flow: the cats/adds in there were never seen
            names = "; ".join(f"{u.path} ({u.cls}): {u.reason}" for u in found.untraceable[:3])
            why.append(f"not examined, torch.fx could not trace {names}"
                       f"{' ...' if len(found.untraceable) > 3 else ''}; make that forward traceable, or pass "
                       "concrete_args= or leaf_types=")
        warnings.warn(f"rewrite: no fusion site was rewritten in {type(model).__name__}; returned unchanged"
                      + (f" ({'; '.join(why)})" if why else ""), stacklevel=2)
    if placed and init == "preserve" and calib_data is None and example_inputs is None:
        warnings.warn("rewrite(init='preserve') got no data: the sites compute the original model exactly, but "
                      "their γ, β are not matched to its statistics, so the normalized form will match it less "
                      "well once NormSchedule opens the gate; pass example_inputs or calib_data=", stacklevel=2)
        for row in placed:
            row.pop("path")
            row.update({"max |Δ| now": "0", "rel. L2 at mix=1": "not calibrated"})
    elif placed and init == "preserve":
        batches = calibration_batches(calib_data if calib_data is not None else [batch])
        deviation = calibrate_sites(model, batches)
        for row in placed:
            row.update({k: f"{v:.2g}" for k, v in deviation.get(row.pop("path"), {}).items()})
    else:
        for row in placed:
            row.pop("path")
    reports = model.__dict__.setdefault("fxfusion_reports", {})
    reports["rewrite"] = RewriteReport(placed, refused + list(found.refused), found)
    return model


class _SiteMismatch(RuntimeError):
    pass


def _first_batch(calib_data: Iterable | None, example_inputs) -> tuple | None:
    if calib_data is not None:
        return calibration_batches(calib_data, 1)[0]
    return normalize_inputs(example_inputs) if example_inputs is not None else None


def _place_foldable(model: nn.Module, sites: list[FusionSite], fold: str, batch: tuple | None, options: dict,
                    leaf_types: Iterable[type], conv_bn: list[tuple[str, str]] | None
                    ) -> tuple[list[dict], list[Refusal], dict[str, str]]:
    """Place the sites, keep those deploy can fold as ``fold`` asks, and put the others back.

    Returns the placed rows, the refusals and, per site, how deploy will fold it. Placement happens
    once, on ``model`` itself; deploy's planner then judges it on a scratch copy
    (:func:`~fxfusion.passes.foldability.predict_folds`). Only the owners of refused sites get their
    previous class (and forward) back, lose the new children, and are placed again without them,
    because a site's fold can depend on its neighbours being sites too: repeat until none drops.
    """
    before = {}  # what each owner was before this placement, to put back
    for owner in {s.owner for s in sites}:
        with contextlib.suppress(AttributeError):  # a missing owner is refused by _place
            m = model.get_submodule(owner) if owner else model
            before[owner] = (type(m), {name for name, _ in m.named_children()})
    placed, refused = _place(model, sites, options, leaf_types)
    if not placed or batch is None:
        if placed and fold != "any":
            warnings.warn("rewrite: no example_inputs or calib_data, so whether deploy can fold each site was not "
                          "checked; every site is placed", stacklevel=3)
        return placed, refused, {}
    allowed = {"exact": ("exact",), "approximate": ("exact", "approximate"), "any": ("exact", "approximate",
                                                                                       "explicit")}[fold]
    by_name = {s.name: s for s in sites}
    folds: dict[str, str] = {}
    while True:
        try:
            decisions = predict_folds(model, batch, conv_bn)
        except Exception as e:  # noqa: BLE001 - a failed prediction must not lose the sites: place them, say so
            warnings.warn(f"rewrite: could not predict how deploy folds the sites ({failure_reason(e)}); every "
                          "site is placed", stacklevel=3)
            return placed, refused, {}
        dropped = set()
        for row in placed:
            d = decisions.get(row["path"])
            kind = verdict(d)
            how = f"{kind}: {d.target}" if d is not None else "explicit: the site did not run on the example inputs"
            folds[row["site"]] = how + (f" ({d.note})" if d is not None and d.note else "")
            if kind not in allowed:
                dropped.add(row["site"])
                refused.append(Refusal(row["site"], row["op"], f"not placed: deploy could not fold it {FOLDS[fold]} "
                                       f"({folds[row['site']]}); pass fold='any' to place it anyway"))
        if not dropped:
            return placed, refused, folds
        redo = {by_name[name].owner for name in dropped}
        for owner in redo:
            m = model.get_submodule(owner) if owner else model
            m.__class__, children = before[owner]
            for name in [n for n, _ in m.named_children() if n not in children]:
                delattr(m, name)
        again = [by_name[r["site"]] for r in placed if by_name[r["site"]].owner in redo and r["site"] not in dropped]
        placed = [r for r in placed if by_name[r["site"]].owner not in redo]
        more, not_placed = _place(model, again, options, leaf_types)
        placed += more
        refused += not_placed


def _place(model: nn.Module, sites: list[FusionSite], options: dict,
           leaf_types: Iterable[type]) -> tuple[list[dict], list[Refusal]]:
    """Put a GABFusion module at each site, owner by owner; a failing owner keeps its forward."""
    by_owner: dict[str, list[FusionSite]] = defaultdict(list)
    for site in sites:
        by_owner[site.owner].append(site)
    placed: list[dict] = []
    refused: list[Refusal] = []
    for owner, owner_sites in by_owner.items():
        try:
            owner_module = model.get_submodule(owner) if owner else model
        except AttributeError:
            refused += [Refusal(s.name, s.kind, f"module {owner!r} not found in this model") for s in owner_sites]
            continue
        try:
            placed += _rewrite_owner(owner, owner_module, owner_sites, options, leaf_types)
        except _SiteMismatch as e:
            refused += [Refusal(s.name, s.kind, str(e)) for s in owner_sites]
        except Exception as e:  # noqa: BLE001 - reported per site; the owner keeps its original forward
            refused += [Refusal(s.name, s.kind, f"owner {type(owner_module).__name__} could not be re-traced: "
                                f"{failure_reason(e)}") for s in owner_sites]
    return placed, refused


def _rewrite_owner(owner: str, module: nn.Module, sites: list[FusionSite], options: dict,
                   leaf_types: Iterable[type]) -> list[dict]:
    graph = shallow_trace(module, leaf_types, sites[0].owner_list_args, sites[0].owner_none_args)
    ordinals = fusion_ordinals(graph)
    by_index = {idx: n for n, (o, idx) in ordinals.items() if o == ""}
    count = len(by_index)
    placed, done = [], set()
    for site in sites:
        index = site.index % count if count else site.index  # a module called twice shows its ops twice
        node = by_index.get(index)
        if node is None or fusion_kind(node) != site.kind:
            raise _SiteMismatch(f"op #{site.index} of {type(module).__name__}.forward is not a {site.kind}; "
                                "the model changed since find_fusions")
        if index in done:
            continue
        done.add(index)
        name = f"gabfusion{index}"
        operands, tree = _operands(node, site, by_index, count)
        widths = tuple(shape[site.axis] for shape in site.shapes) if site.kind == "cat" else None
        fusion = GABFusion(site.kind, site.num_branches, site.axis, site.channels, add_tree=tree,
                           branch_channels=widths, **options)
        module.add_module(name, fusion)
        with graph.inserting_before(node):
            new = graph.call_module(name, tuple(operands))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for i in site.absorbed:
            inner = by_index[i % count]
            if not inner.users:
                graph.erase_node(inner)
        placed.append({"site": site.name, "module": owner or "<root>", "class": site.owner_class,
                       "op": site.kind, "branches": site.num_branches, "axis": site.axis,
                       "alpha": options["alpha"], "norm": options["norm"],
                       "init": "preserve" if options["preserve"] else "paper",
                       "path": f"{owner}.{name}" if owner else name})
    graph.lint()
    _specialize(module, graph)
    return placed


def _operands(node: fx.Node, site: FusionSite, by_index: dict, count: int) -> tuple[list, tuple | None]:
    """The branches of a site, and for a merged add chain its nesting (so the sum keeps the
    original association and α = 1 reproduces the model bit for bit)."""
    if site.kind == "cat":
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        return (list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]), None
    inner = {by_index[i % count] for i in site.absorbed}
    operands: list = []

    def expand(n):
        tree = []
        for a in (n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")):
            if a in inner:
                tree.append(expand(a))
            else:
                operands.append(a)
                tree.append(len(operands) - 1)
        return tuple(tree)

    tree = expand(node)
    if len(operands) != site.num_branches:
        raise _SiteMismatch(f"{site.name}: expected {site.num_branches} branches, found {len(operands)}")
    return operands, tree


# --- keeping the owner's object and class ---------------------------------------------------------

def _specialize(module: nn.Module, graph: fx.Graph) -> None:
    """Give ``module`` the forward of ``graph`` through a subclass of its own class."""
    base = getattr(type(module), "_fxfusion_base", type(module))
    for node in graph.nodes:
        node.type = None  # annotations would need their types importable by name when unpickling
    python_code = graph.python_code(root_module="self")
    import_block = _format_import_block(python_code.globals, sys_importer)
    info = getattr(graph._codegen, "pytree_info", None)  # list inputs traced flat (fx PH): keep the spec
    if info is not None:
        module._in_spec, module._out_spec = info.in_spec, info.out_spec
    module.__class__ = _make_class(base, python_code.src, import_block)


@functools.lru_cache(maxsize=None)
def _make_class(base: type, src: str, import_block: str) -> type:
    """One subclass per distinct (class, forward source): owners with the same code share it."""
    namespace: dict = {}
    exec(compile(import_block + "\n" + src, f"<fxfusion {base.__name__}.forward>", "exec"), namespace)
    forward = namespace["forward"]
    return type(base.__name__, (base,), {
        "forward": forward,
        "_fxfusion_base": base,
        "_fxfusion_src": (src, import_block),
        "__reduce_ex__": _reduce_ex,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    })


def _reduce_ex(self, protocol):
    # The subclass is made at run time, so pickle/deepcopy rebuild it from the source.
    return _rebuild, (type(self)._fxfusion_base, *type(self)._fxfusion_src, self.__dict__)


def _rebuild(base: type, src: str, import_block: str, state: dict) -> nn.Module:
    obj = base.__new__(base)
    obj.__dict__.update(state)
    obj.__class__ = _make_class(base, src, import_block)
    return obj


def restore_forward(module: nn.Module) -> bool:
    """Give a rewritten owner back its original class (and forward). True if it was rewritten."""
    base = getattr(type(module), "_fxfusion_base", None)
    if base is None:
        return False
    module.__class__ = base
    return True


def gabfusion_modules(model: nn.Module) -> dict[str, GABFusion]:
    """Every GABFusion module in ``model`` by its path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GABFusion)}
