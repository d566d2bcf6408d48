"""Fusion-site discovery: which cats and adds are real branch fusions.

A *site* is a ``torch.cat``/``concat``/``concatenate`` or an add (``operator.add``,
``operator.iadd``, ``torch.add``, ``Tensor.add``/``add_``) that

1. joins two or more *activations*: tensors computed from a graph input through tensor
   data (not parameters, buffers, constants or shape arithmetic: ``cls.expand(B, -1, -1)``
   is not an activation even though ``B`` came from the input's shape);
2. joins them along the *feature axis*: the axis the downstream learnable layer reads as
   channels (dim 1 for conv/batch-norm, the last dim for linear/layer-norm);
3. reaches a learnable layer before any model output (a detection head's final cat does not).

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

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxfusion.gabfusion import GABFusion
from fxfusion.passes.trace import TracedUnit, Untraceable, trace_units
from fxfusion.report import dumps, format_table

__all__ = ["FusionReport", "FusionSite", "Refusal", "find_fusions", "fusion_kind", "fusion_ordinals", "OP_NAMES"]

CAT_FNS = (torch.cat, torch.concat, torch.concatenate)
ADD_FNS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
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

    Returns:
        A :class:`FusionReport`; ``print`` it for a table, ``.to_json()`` for tools.

    Example:
        >>> report = find_fusions(model, torch.randn(1, 3, 64, 64))
        >>> print(report)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_fusions expects a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    keep_ops = _check_ops(ops)
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")

    traced = trace_units(model, concrete_args, leaf_types)
    report = FusionReport(untraceable=list(traced.untraceable))
    run = _run_example(model, traced.units, inputs)
    for unit in traced.units:
        if unit.path not in run.unit_args:
            report.refused.append(Refusal(unit.path, "module", "not executed on the example inputs; not examined"))
            continue
        _find_in_unit(model, unit, run, report)

    filtered = []
    for site in report.sites:
        why = _filtered_by(site, keep_ops, inc, exc, predicate)
        if why:
            report.refused.append(Refusal(site.name, site.kind, f"filtered out by {why}"))
        else:
            filtered.append(site)
    report.sites = filtered
    return report


def normalize_inputs(example_inputs: Tensor | Sequence) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a Tensor or a tuple of inputs, got {type(example_inputs).__name__}")


def describe_inputs(inputs: tuple) -> str:
    """``(2, 3, 64, 64) float32, int`` for error messages: each input's shape and dtype (or type)."""
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, Tensor)
                     else type(x).__name__ for x in inputs)


# --- the example forward -------------------------------------------------------------------

@dataclass
class _Run:
    unit_args: dict[str, tuple[tuple, dict]]
    unit_out_axes: dict[str, list[set[int]]]
    list_args: dict[str, tuple[int | None, ...]]


def _run_example(model: nn.Module, units: list[TracedUnit], inputs: tuple) -> _Run:
    """One eval-mode forward: capture unit inputs, and which unit outputs reach which layer kind."""
    unit_args: dict[str, tuple[tuple, dict]] = {}
    out_fns: dict[str, list] = {}
    consumers: list[tuple[object, int]] = []
    handles = []
    for unit in units:
        if not unit.path:
            continue

        def pre(m, args, kwargs, path=unit.path):
            unit_args.setdefault(path, (args, kwargs))

        def post(m, args, out, path=unit.path):
            out_fns.setdefault(path, [getattr(t, "grad_fn", None) for t in leaves(out)])

        handles.append(unit.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(unit.module.register_forward_hook(post))
    list_args: dict[str, tuple[int | None, ...]] = {}
    for path, m in model.named_modules():
        if not m.__module__.startswith("torch.nn"):

            def record_lists(mod, args, path=path) -> None:
                list_args.setdefault(path, tuple(len(a) if isinstance(a, (list, tuple)) else None for a in args))

            handles.append(m.register_forward_pre_hook(record_lists))
        kind = layer_kind(m)
        if kind:

            def record_consumer(mod, args, kind=kind) -> None:
                if args and isinstance(args[0], Tensor):
                    consumers.append((args[0].grad_fn, feature_axis(kind, args[0].dim())))

            handles.append(m.register_forward_pre_hook(record_consumer))

    run_inputs = tuple(x.detach().clone().requires_grad_(True) if isinstance(x, Tensor) and x.is_floating_point()
                       else x for x in inputs)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.enable_grad():
            model(*run_inputs)
    except Exception as e:
        raise ValueError(f"{type(model).__name__} failed on the example inputs ({describe_inputs(inputs)}): {e}. "
                         "Pass inputs of the shape and dtype the model expects.") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
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
    return _Run(unit_args, axes, list_args)


def leaves(obj) -> list:
    """Flatten nested tuples/lists/dicts in order (same order for fx args and runtime values)."""
    if isinstance(obj, (list, tuple)):
        return [leaf for o in obj for leaf in leaves(o)]
    if isinstance(obj, dict):
        return [leaf for o in obj.values() for leaf in leaves(o)]
    return [obj]


# --- layer kinds ----------------------------------------------------------------------------

_CHANNEL_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm)
_LAST_LAYERS = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)
_CHANNEL_FNS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.batch_norm, F.group_norm)
_LAST_FNS = (F.linear, F.layer_norm)


def feature_axis(kind: str, ndim: int) -> int:
    """The axis a layer of ``kind`` reads as features in an input of ``ndim`` dims."""
    return 1 if kind == "channel" else ndim - 1


def layer_kind(m: nn.Module) -> str | None:
    """``"channel"`` (reads dim 1), ``"last"`` (reads the last dim) or None (not a learnable layer)."""
    if isinstance(m, _CHANNEL_LAYERS):
        return "channel"
    if isinstance(m, _LAST_LAYERS):
        return "last"
    return None


_TRANSPARENT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.Mish, nn.ELU, nn.Identity, nn.Upsample, nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, GABFusion,
)
_TRANSPARENT_FNS = {
    F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.mish, F.elu, F.dropout, F.interpolate,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.cat, torch.concat, torch.concatenate,
    torch.add, torch.mul, torch.sub, operator.add, operator.iadd, operator.mul, operator.sub, operator.truediv,
    F.sigmoid if hasattr(F, "sigmoid") else torch.sigmoid,
}
_TRANSPARENT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "add", "add_", "mul", "mul_", "sub", "div",
                        "contiguous", "clone", "float", "clamp", "clamp_"}


def _consumer_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return layer_kind(modules[node.target])
    if node.op == "call_function":
        if node.target in _CHANNEL_FNS:
            return "channel"
        if node.target in _LAST_FNS:
            return "last"
    return None


def _transparent(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops that keep the feature axis where it is, so the consumer walk may pass them."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Flatten):
            return m.start_dim == 1
        return isinstance(m, _TRANSPARENT_MODULES) or hasattr(m, "qparams")
    if _is_mean(node):
        return _mean_keeps_features(node)
    if _flattens_from(node) is not None:
        return _flattens_from(node) == 1  # (N, C, ...) -> (N, C·...) keeps the feature axis at 1
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FNS
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS
    return False


def _is_mean(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.mean) or (
        node.op == "call_method" and node.target == "mean")


def _mean_keeps_features(node: fx.Node) -> bool:
    """Global pooling ``x.mean((2, 3))``: reducing only axes past 1 keeps the feature axis at 1."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    ndim = len(meta.shape) if hasattr(meta, "shape") else None
    return ndim is not None and ndim > 2 and all(isinstance(d, int) and d % ndim >= 2 for d in dims)


def _flattens_from(node: fx.Node) -> int | None:
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return None


def _walk_consumers(start: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[tuple[str, int]], list[fx.Node]]:
    """Learnable layers reached through axis-preserving ops (with the axis they read as
    features), and the nodes that hit the graph output."""
    found, to_output, seen, queue = [], [], {start}, [start]
    while queue:
        cur = queue.pop(0)
        for user in cur.users:
            if user.op == "output":
                to_output.append(cur)
            elif (kind := _consumer_kind(user, modules)) is not None and hasattr(_meta(cur), "shape"):
                found.append((_node_label(user), feature_axis(kind, len(_meta(cur).shape))))
            elif _transparent(user, modules) and user not in seen:
                seen.add(user)
                queue.append(user)
    return found, to_output


def _node_label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


# --- candidates and owners ------------------------------------------------------------------

def fusion_kind(node: fx.Node) -> str | None:
    """``"cat"``/``"add"`` when the node is syntactically a fusion op, else None."""
    if node.op == "call_function":
        if node.target in CAT_FNS:
            return "cat"
        if node.target in ADD_FNS:
            return "add"
    if node.op == "call_method" and node.target in ADD_METHODS:
        return "add"
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
    if node.op == "call_method":
        return [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]
    return [node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")]


# --- per-unit analysis ----------------------------------------------------------------------

def _find_in_unit(model: nn.Module, unit: TracedUnit, run: _Run, report: FusionReport) -> None:
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
        owner = _join(unit.path, local_owner)
        where = f"{owner or '<root>'}:{node.name}"
        kind = fusion_kind(node)
        result = _check_candidate(node, kind, act, modules, unit, run, ordinals)
        if isinstance(result, str):
            report.refused.append(Refusal(where, kind, result))
            continue
        operands, axis, consumers, inner = result
        absorbed.update(inner)
        shapes = tuple(_branch_shapes(operands))
        out_meta = _meta(node)
        owner_module = model.get_submodule(owner) if owner else model
        site = FusionSite(
            name=_join(owner, f"gabfusion{index}"),
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

    found, to_output = _walk_consumers(node, modules)
    axes = {a for _, a in found}
    labels = [_join(unit.path, label) for label, _ in found]
    for out_node in to_output:
        outside = _outside_axes(unit, out_node, run)
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
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*values)
    finally:
        for m, t in modes.items():
            m.training = t


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


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}={pattern!r} is not a valid regular expression: {e}") from e


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


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    return f"{prefix}.{name}" if name else prefix
