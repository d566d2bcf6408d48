"""Fusion-site discovery: which cats and adds are real branch fusions.

A *site* is a ``torch.cat``/``concat``/``concatenate`` or an add (``operator.add``,
``operator.iadd``, ``torch.add``, ``Tensor.add``/``add_``) that

1. joins two or more *activations*: tensors computed from a graph input through tensor
   data (not parameters, buffers, constants or shape arithmetic: ``cls.expand(B, -1, -1)``
   is not an activation even though ``B`` came from the input's shape);
2. joins them along the *feature axis*: the axis the downstream learnable layer reads as
   channels (dim 1 for conv/batch-norm, the last dim for linear/layer-norm);
3. reaches a learnable layer before any model output (a detection head's final cat does not).

An add whose every branch is a linear function of one tensor (RepConv, RepVGG: conv+BatchNorm,
BatchNorm and identity branches of the same input) is refused as *re-parameterizable* unless
``reparameterizable=True``: deploy-time re-parameterization merges those branches into one conv
and bypasses the add, and a GABFusion there with it (:mod:`~fxfusion.passes.reparam`).

Adds of equal-shaped operands only (a broadcasting add is a gate, not a branch fusion);
an add whose only user is another site add is merged into it (``a + b + c`` is one
3-branch site). Everything refused keeps its reason, so ``fxfusion inspect`` can say why.

How: :func:`~fxfusion.passes.trace.trace_units` gives deep graphs of the traceable parts;
one real forward on the example inputs records each unit's inputs (for
``torch.fx.passes.shape_prop.ShapeProp``) and, through the autograd graph, which unit
outputs reach which kind of learnable layer outside the unit. Each site is attributed to
its *owner*: the innermost module whose own forward performs the fusion, which is what
:func:`fxfusion.rewrite` later edits.
"""

from __future__ import annotations

import contextlib
import io
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.immutable_collections import immutable_list
from torch.fx.passes.shape_prop import ShapeProp

from fxfusion.passes.consumers import mapped_axes, walk_consumers
from fxfusion.passes.dataflow import feature_axis, layer_kind, node_op
from fxfusion.passes.quantize import conv_bn_pairs
from fxfusion.passes.reparam import reparam_refusal
from fxfusion.passes.runtime import (
    compile_regex,
    eval_mode,
    failure_reason,
    join,
    leaves,
    network,
    normalize_inputs,
    removing,
    run_example,
    tracked,
)
from fxfusion.passes.trace import FxTracer, TracedUnit, Untraceable, none_arguments, trace_module, trace_units
from fxfusion.report import dumps, format_table

__all__ = ["FusionReport", "FusionSite", "Refusal", "find_fusions", "fusion_kind", "fusion_ordinals", "OP_NAMES"]

# Names accepted by the ``ops=`` filter.
OP_NAMES = {"cat": "cat", "concat": "cat", "concatenate": "cat", "add": "add", "iadd": "add", "add_": "add"}


@dataclass(frozen=True)
class FusionSite:
    """One fusion site, as :func:`fxfusion.rewrite` consumes it.

    ``owner`` is the module whose own forward performs the fusion; ``index`` is the
    ordinal of the fusion op among that forward's cat/add calls (how rewrite finds it
    again); ``absorbed`` lists the ordinals of inner adds merged into this site.
    """

    name: str
    kind: str
    owner: str
    owner_class: str
    index: int
    num_branches: int
    shapes: tuple[tuple[int, ...], ...]
    axis: int
    channels: int
    consumers: tuple[str, ...]
    absorbed: tuple[int, ...] = ()
    owner_list_args: tuple[int | None, ...] = ()
    owner_none_args: tuple[str, ...] = ()

    def row(self) -> dict:
        return {"site": self.name, "op": self.kind, "module": self.owner or "<root>", "class": self.owner_class,
                "branches": self.num_branches, "shapes": " + ".join("x".join(map(str, s)) for s in self.shapes),
                "axis": self.axis, "consumers": ", ".join(self.consumers)}


@dataclass(frozen=True)
class Refusal:
    """A cat/add that is not a site (or was filtered out), with the reason."""

    where: str
    kind: str
    reason: str


@dataclass
class FusionReport:
    """What :func:`find_fusions` saw: sites, refused candidates, untraceable modules."""

    sites: list[FusionSite] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    untraceable: list[Untraceable] = field(default_factory=list)
    # conv -> BatchNorm pairs (paths) that quantize and deploy fold, seen on the same trace: rewrite's
    # deploy prediction uses them instead of tracing again (None: not known, e.g. a hand-made report)
    conv_bn: list[tuple[str, str]] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def __getitem__(self, i: int) -> FusionSite:
        return self.sites[i]

    def __str__(self) -> str:
        parts = [format_table([s.row() for s in self.sites], title=f"Fusion sites ({len(self.sites)})")]
        if self.refused:
            parts.append(format_table([vars(r) for r in self.refused], title=f"Not sites ({len(self.refused)})"))
        if self.untraceable:
            title = f"Untraceable modules ({len(self.untraceable)}): their own cats/adds were not examined"
            parts.append(format_table([vars(u) for u in self.untraceable], title=title))
        return "\n\n".join(parts)

    def to_dict(self) -> dict:
        return {"sites": self.sites, "refused": self.refused, "untraceable": self.untraceable}

    def to_json(self) -> str:
        return dumps(self)


def find_fusions(
    model: nn.Module,
    example_inputs: Tensor | Sequence,
    *,
    ops: Iterable[str] | None = None,
    include: str | None = None,
    exclude: str | None = None,
    predicate: Callable[[FusionSite], bool] | None = None,
    concrete_args: dict | None = None,
    leaf_types: Iterable[type] = (),
    reparameterizable: bool = False,
) -> FusionReport:
    """Find every feature-fusion node (cat or add of branches) in ``model``.

    Args:
        model: any ``nn.Module``; it is run once on ``example_inputs`` in eval mode
            (modes and buffers are restored; nothing is changed).
        example_inputs: a tensor or a tuple of positional inputs.
        ops: keep only these ops (``"cat"``, ``"concat"``, ``"concatenate"``, ``"add"``, ``"iadd"``, ``"add_"``).
        include / exclude: regexes on the owner module path (``re.search``).
        predicate: a final ``site -> bool`` filter.
        concrete_args, leaf_types: passed to the tracer.
        reparameterizable: also make sites of adds whose branches are all linear functions of one
            input (RepConv, RepVGG). By default they are refused: a re-parameterization (Ultralytics'
            ``fuse()``, timm's ``reparameterize``) merges the branches into one conv and drops the
            add, and any GABFusion on it, so the fused model would no longer compute the trained one.
            Set it only for a model that will be deployed without re-parameterizing; then rewrite
            with ``rewrite(model, x, sites=find_fusions(model, x, reparameterizable=True))``.

    Returns:
        A :class:`FusionReport`; ``print`` it for a table, ``.to_json()`` for tools.

    Example:
        >>> from fxfusion.zoo import build
        >>> report = find_fusions(build("resnet"), torch.randn(1, 3, 32, 32))
        >>> len(report) > 0, report[0].kind
        (True, 'add')
    """
    model = network(model, "find_fusions")
    inputs = normalize_inputs(example_inputs)
    keep_ops = _check_ops(ops)
    inc, exc = compile_regex(include, "include"), compile_regex(exclude, "exclude")

    traced = trace_units(model, concrete_args, leaf_types)
    report = FusionReport(untraceable=list(traced.untraceable), conv_bn=conv_bn_pairs(traced.units))
    run = _run_example(model, traced.units, inputs)
    for unit in traced.units:
        _examine(model, unit, run, report, tuple(leaf_types), reparameterizable)

    filtered = []
    for site in report.sites:
        why = _filtered_by(site, keep_ops, inc, exc, predicate)
        if why:
            report.refused.append(Refusal(site.name, site.kind, f"filtered out by {why}"))
        else:
            filtered.append(site)
    report.sites = filtered
    return report


# --- the example forward -------------------------------------------------------------------

@dataclass
class _Run:
    unit_args: dict[str, tuple[tuple, dict]]
    unit_out_axes: dict[str, list[set[int]]]
    list_args: dict[str, tuple[int | None, ...]]
    none_args: dict[str, set[str]]


def _run_example(model: nn.Module, units: list[TracedUnit], inputs: tuple) -> _Run:
    """One eval-mode forward: capture unit inputs, and which unit outputs reach which layer kind."""
    unit_args: dict[str, tuple[tuple, dict]] = {}
    out_fns: dict[str, list] = {}
    consumers: list[tuple[object, int]] = []
    handles = []
    # every unit, and every module of the user's (a unit that fails is examined through its children)
    watched = {u.path: u.module for u in units if u.path}
    watched.update({p: m for p, m in model.named_modules() if p and not m.__module__.startswith("torch.nn")})
    for path, module in watched.items():

        def pre(m, args, kwargs, path=path):
            # copies of list arguments: a caller may append to its list afterwards (timm's DenseBlock)
            unit_args.setdefault(path, (tuple(list(a) if isinstance(a, list) else a for a in args), kwargs))

        def post(m, args, out, path=path):
            out_fns.setdefault(path, [getattr(t, "grad_fn", None) for t in leaves(out)])

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    list_args: dict[str, tuple[int | None, ...]] = {}
    none_args: dict[str, set[str]] = {}
    for path, m in model.named_modules():
        if not m.__module__.startswith("torch.nn"):

            def record_call(mod, args, kwargs, path=path) -> None:
                list_args.setdefault(path, tuple(len(a) if isinstance(a, (list, tuple)) else None for a in args))
                nones = none_arguments(mod, args, kwargs)  # None in every call: see trace.none_arguments
                none_args[path] = none_args[path] & nones if path in none_args else nones

            handles.append(m.register_forward_pre_hook(record_call, with_kwargs=True))
        kind = layer_kind(m)
        if kind:

            def record_consumer(mod, args, kind=kind) -> None:
                if args and isinstance(args[0], Tensor):
                    consumers.append((args[0].grad_fn, feature_axis(kind, args[0].dim())))

            handles.append(m.register_forward_pre_hook(record_consumer))

    with removing(handles):
        run_example(model, tracked(inputs), grad=True)
    unit_args[""] = (inputs, {})  # the root unit (whole model traced) runs on the inputs

    reached: dict[object, set[int]] = {}
    for fn, kind in consumers:
        stack = [fn]
        while stack:
            f = stack.pop()
            if f is None or kind in reached.setdefault(f, set()):
                continue
            reached[f].add(kind)
            stack.extend(nf for nf, _ in f.next_functions)
    axes = {p: [set(reached.get(f, ())) if f is not None else set() for f in fns] for p, fns in out_fns.items()}
    return _Run(unit_args, axes, list_args, none_args)


# --- candidates and owners ------------------------------------------------------------------

def fusion_kind(node: fx.Node) -> str | None:
    """``"cat"``/``"add"`` when the node is syntactically a fusion op (a function or method call), else None."""
    if node.op in ("call_function", "call_method"):
        op = node_op(node, {})
        return op if op in ("cat", "add") else None
    return None


def owner_of(node: fx.Node) -> str:
    """Path (relative to the traced root) of the innermost module whose forward made ``node``."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def fusion_ordinals(graph: fx.Graph) -> dict[fx.Node, tuple[str, int]]:
    """Number each owner's fusion ops in graph order: node -> (owner, ordinal)."""
    counts: dict[str, int] = {}
    out = {}
    for node in graph.nodes:
        if fusion_kind(node):
            owner = owner_of(node)
            out[node] = (owner, counts.get(owner, 0))
            counts[owner] = counts.get(owner, 0) + 1
    return out


def cat_operands(node: fx.Node) -> list:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


def cat_dim(node: fx.Node) -> int:
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("dim", node.kwargs.get("axis", 0))


def add_operands(node: fx.Node) -> list:
    """The two operands of ``a + b``, ``torch.add(a, b)`` or ``a.add(b)`` (``other=`` as a keyword too)."""
    return [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]


# --- per-unit analysis ----------------------------------------------------------------------

def _examine(model: nn.Module, unit: TracedUnit, run: _Run, report: FusionReport, leaf_types: tuple,
             reparameterizable: bool) -> None:
    """Find the sites of one unit. If fxfusion fails on it, that is its refusal, and its children
    are examined as units of their own: one odd module never costs the sites around it."""
    if unit.path not in run.unit_args:
        report.refused.append(Refusal(unit.path, "module", "not executed on the example inputs; not examined"))
        return
    n_sites, n_refused = len(report.sites), len(report.refused)
    try:
        if unit.path and run.none_args.get(unit.path):  # the graph the model runs: None arguments fixed
            concrete = dict.fromkeys(sorted(run.none_args[unit.path]))
            unit = TracedUnit(unit.path, unit.module, trace_module(unit.module, FxTracer(leaf_types), concrete))
        _find_in_unit(model, unit, run, report, leaf_types, reparameterizable)
    except Exception as e:  # noqa: BLE001 - one module's failure is its refusal, never the whole report's
        del report.sites[n_sites:], report.refused[n_refused:]
        report.refused.append(Refusal(unit.path or "<root>", "module",
                                      f"not examined as a whole: fxfusion failed on it ({failure_reason(e)}); "
                                      "its submodules were examined one by one"))
        for name, child in unit.module.named_children():
            sub = trace_units(child, None, leaf_types)
            for u in sub.untraceable:
                entry = Untraceable(join(join(unit.path, name), u.path.replace("<root>", "")), u.cls, u.reason)
                if entry not in report.untraceable:
                    report.untraceable.append(entry)
            for child_unit in sub.units:
                path = join(join(unit.path, name), child_unit.path)
                _examine(model, TracedUnit(path, child_unit.module, child_unit.graph_module), run, report,
                         leaf_types, reparameterizable)


def _find_in_unit(model: nn.Module, unit: TracedUnit, run: _Run, report: FusionReport, leaf_types: tuple,
                  reparameterizable: bool) -> None:
    gm = unit.graph_module
    args, kwargs = run.unit_args[unit.path]
    _propagate_shapes(gm, args, kwargs)
    modules = dict(gm.named_modules())
    act = _activation_flags(gm.graph)
    ordinals = fusion_ordinals(gm.graph)
    absorbed: set[fx.Node] = set()
    found: list[FusionSite] = []
    candidates = [n for n in gm.graph.nodes if n in ordinals and _meta(n) is not None]
    # Outer adds first, so that merged inner adds are known before we reach them.
    for node in reversed(candidates):
        if node in absorbed:
            continue
        local_owner, index = ordinals[node]
        owner = join(unit.path, local_owner)
        where = f"{owner or '<root>'}:{node.name}"
        kind = fusion_kind(node)
        result = _check_candidate(node, kind, act, modules, unit, run, ordinals)
        if isinstance(result, str):
            report.refused.append(Refusal(where, kind, result))
            continue
        operands, axis, consumers, inner = result
        absorbed.update(inner)  # a refused chain too: one refusal for a 3-branch RepConv
        why = None if kind == "cat" or reparameterizable else reparam_refusal(operands, modules, leaf_types)
        if why:
            report.refused.append(Refusal(where, kind, why))
            continue
        shapes = tuple(_branch_shapes(operands))
        out_meta = _meta(node)
        owner_module = model.get_submodule(owner) if owner else model
        site = FusionSite(
            name=join(owner, f"gabfusion{index}"),
            kind=kind,
            owner=owner,
            owner_class=type(owner_module).__name__,
            index=index,
            num_branches=len(shapes),
            shapes=shapes,
            axis=axis,
            channels=int(out_meta.shape[axis]),
            consumers=tuple(consumers),
            absorbed=tuple(sorted(ordinals[n][1] for n in inner)),
            owner_list_args=run.list_args.get(owner, ()),
            owner_none_args=tuple(sorted(run.none_args.get(owner, ()))),
        )
        found.append(site)
    report.sites += reversed(found)  # graph order (we walked backwards)


def _check_candidate(node, kind, act, modules, unit, run, ordinals):
    """Return (operands, axis, consumer labels, absorbed inner adds), or the refusal reason."""
    out_meta = _meta(node)
    if not hasattr(out_meta, "shape"):
        return "result is not a single tensor"
    ndim = len(out_meta.shape)
    inner: list[fx.Node] = []
    if kind == "cat":
        operands = cat_operands(node)
        n_act = sum(1 for o in operands if isinstance(o, fx.Node) and act.get(o))
        if len(operands) == 1 and isinstance(operands[0], fx.Node) and act.get(operands[0]):
            n_act = len(_branch_shapes(operands))  # cat of a list-valued input (YOLO Concat)
        elif n_act < len(operands):
            return (f"joins {n_act} activation(s) and {len(operands) - n_act} parameter/constant operand(s)")
        if n_act < 2:
            return f"joins {n_act} activation(s); a fusion needs at least 2"
    else:
        if node.kwargs.get("alpha", 1) != 1:
            return "add with alpha != 1 (a weighted difference, not a plain fusion)"
        operands = add_operands(node)
        n_act = sum(1 for o in operands if isinstance(o, fx.Node) and act.get(o))
        if n_act < 2:
            return f"joins {n_act} activation(s); other operand is a parameter, buffer or constant"
        shapes = [tuple(_meta(o).shape) for o in operands]
        if shapes[0] != shapes[1]:
            return f"broadcasting add of shapes {shapes[0]} and {shapes[1]} (a gate, not a branch fusion)"
        if node.target in ("add_", operator.iadd) and len(operands[0].users) > 1:
            return "in-place add whose input is used again afterwards; rewriting would change its value"
        operands, inner = _merge_adds(node, act, ordinals)

    found, to_output = walk_consumers(node, modules)
    axes = {a for _, a in found}
    labels = [join(unit.path, label) for label, _ in found]
    for out_node, ids in to_output:
        outside = _outside_axes(unit, out_node, run)
        if ids is not None:  # the values were moved on the way: which site axes do those layers read?
            outside = {a for o in outside for a in mapped_axes(ids, o)}
        axes |= outside
        labels += [f"(a layer after {unit.path})"] if outside else []
    if not axes:
        return "result reaches no learnable layer before a model output (e.g. a head's final cat)"
    axes = {a for a in axes if a < ndim}
    if kind == "cat":
        axis = cat_dim(node) % ndim
        if axis not in axes:
            return (f"cat along axis {axis}, but the consumers read axis {sorted(axes)} as features "
                    "(a sequence/token or spatial concatenation)")
    else:
        axis = min(axes)
    return operands, axis, list(dict.fromkeys(labels)), inner


def _merge_adds(node: fx.Node, act: dict, ordinals: dict) -> tuple[list, list[fx.Node]]:
    """Operands of an add chain ``(a + b) + c`` whose inner adds have no other user."""
    operands, inner = [], []
    for o in add_operands(node):
        if (isinstance(o, fx.Node) and fusion_kind(o) == "add" and len(o.users) == 1
                and ordinals[o][0] == ordinals[node][0] and o.kwargs.get("alpha", 1) == 1
                and all(isinstance(x, fx.Node) and act.get(x) for x in add_operands(o))
                and _meta(o) is not None and tuple(_meta(o).shape) == tuple(_meta(node).shape)
                and all(tuple(_meta(x).shape) == tuple(_meta(o).shape) for x in add_operands(o))):
            sub, sub_inner = _merge_adds(o, act, ordinals)
            operands += sub
            inner += [o, *sub_inner]
        else:
            operands.append(o)
    return operands, inner


def _outside_axes(unit: TracedUnit, out_node: fx.Node, run: _Run) -> set[int]:
    if not unit.path:
        return set()  # the unit is the whole model: its output is the model output
    output = next(n for n in unit.graph_module.graph.nodes if n.op == "output")
    flat = leaves(output.args[0])
    axes = run.unit_out_axes.get(unit.path, [])
    return set().union(*(axes[i] for i, x in enumerate(flat) if x is out_node and i < len(axes)))


def _activation_flags(graph: fx.Graph) -> dict[fx.Node, bool]:
    """True for tensors that depend on a graph input through tensor data (not shapes)."""
    act: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            act[node] = _meta(node) is not None
        elif node.op in ("call_function", "call_method", "call_module"):
            act[node] = _meta(node) is not None and any(
                act.get(i, False) for i in node.all_input_nodes if _meta(i) is not None)
        else:
            act[node] = False
    return act


def _meta(node: fx.Node):
    return node.meta.get("tensor_meta")


def _branch_shapes(operands: list) -> list[tuple[int, ...]]:
    shapes = []
    for o in operands:
        meta = _meta(o)
        if hasattr(meta, "shape"):  # TensorMetadata is itself a NamedTuple: test it first
            shapes.append(tuple(meta.shape))
        else:
            shapes += [tuple(m.shape) for m in meta]
    return shapes


def _propagate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for node in placeholders[len(args):]:
        if node.target in kwargs:
            values.append(kwargs[node.target])
        elif node.args:
            values.append(node.args[0])
        else:
            break
    # ShapeProp prints the traceback of a failing node before raising: the caller reports it instead
    with eval_mode(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        _ShapeProp(gm).propagate(*values)


class _ShapeProp(ShapeProp):
    """ShapeProp that also keeps small non-tensor results (sizes, ints) in ``meta["value"]``: the
    consumer walk replays views with them (``x.view(b, g, c // g, h, w)``)."""

    def call_module(self, target, args, kwargs):
        # fx hands a node's list arguments over read-only; a module may write into its list (YOLO's
        # Detect does ``x[i] = ...``), as it may in the model's own forward
        args = tuple(list(a) if isinstance(a, immutable_list) else a for a in args)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, (int, float, bool, torch.Size)) or (
                isinstance(result, (tuple, list)) and len(result) <= 8 and all(isinstance(v, int) for v in result)):
            n.meta["value"] = result
        return result


# --- filters --------------------------------------------------------------------------------

def _check_ops(ops: Iterable[str] | None) -> set[str] | None:
    if ops is None:
        return None
    if isinstance(ops, str):
        ops = [ops]
    bad = [o for o in ops if o not in OP_NAMES]
    if bad:
        raise ValueError(f"unknown op(s) {bad} in ops=; accepted: {sorted(OP_NAMES)}")
    return {OP_NAMES[o] for o in ops}


def _filtered_by(site, keep_ops, inc, exc, predicate) -> str:
    if keep_ops is not None and site.kind not in keep_ops:
        return "ops="
    if inc is not None and not inc.search(site.owner):
        return "include="
    if exc is not None and exc.search(site.owner):
        return "exclude="
    if predicate is not None and not predicate(site):
        return "predicate"
    return ""
