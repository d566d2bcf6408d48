"""Op semantics in one table: what each op does to the feature axis, to signs, to scales and shifts.

Three passes ask questions about the ops between a fusion site and its neighbours:

- :mod:`~fxfusion.passes.find` walks from a cat/add to the learnable layers that read it, through
  ops that **keep the feature axis** where it is (on torch.fx nodes);
- :mod:`~fxfusion.passes.quantize` asks whether a layer's input is **non-negative by
  construction**, following the autograd graph of one example forward back through ops that
  **keep the sign**;
- deploy (:mod:`~fxfusion.passes.fold_plan`) moves a per-channel affine ``s⊙x + b`` through ops
  that **commute with the scale** (``f(s·x) = s·f(x)``, for any ``s`` or only ``s > 0``) and
  sometimes with **the shift** (``f(x + b) = f(x) + b``), also on the autograd graph.

Each op is described once, in :data:`OPS`, under its ATen name (``relu``,
``max_pool2d_with_indices``, ``_unsafe_view``). Both vocabularies resolve to that name: fx
targets (``F.relu``, ``"relu_"``, ``nn.ReLU``) through :data:`FX_FUNCTIONS`, :data:`FX_METHODS` and
:data:`FX_MODULES`; autograd nodes by their class name (``ReluBackward0`` → ``relu``, compared
without underscores and case, so a renumbered backward node still resolves). :func:`register_op`
adds an op for all three passes at once.

The few facts that depend on an op's arguments (ReLU6's lower bound, which axes a mean reduces,
a flatten's start, a parameter-free module that keeps its input's shape) are the functions below
the table, next to it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FX_FUNCTIONS",
    "FX_METHODS",
    "FX_MODULES",
    "OPS",
    "OpFacts",
    "consumer_kind",
    "feature_axis",
    "grad_fn_facts",
    "grad_fn_name",
    "keeps_feature_axis",
    "layer_kind",
    "nonneg",
    "register_op",
    "unregister_op",
]


@dataclass(frozen=True)
class OpFacts:
    """What one op does, as the passes need it.

    Attributes:
        keeps_axis: the output keeps the input's feature axis at the same position (elementwise
            ops, pooling, upsampling, cat, add): find may walk through it to a consumer.
        sign: ``"nonneg"`` the output is >= 0 for any input (ReLU, sigmoid); ``"keeps"`` a
            non-negative input gives a non-negative output (pooling, views, cat); ``"clamped"``
            non-negative when its saved lower bound is >= 0 (ReLU6 as hardtanh, clamp); None.
        scale: ``"any"`` ``f(s⊙x) = s⊙f(x)`` for every per-channel ``s`` (linear per channel);
            ``"positive"`` only for ``s > 0`` (ReLU, max pooling); None: neither.
        shift: ``f(x + b) = f(x) + b`` for a per-channel ``b`` (nearest upsampling, max pooling).
        reshapes: moves values between axes (a view): a layer after it reads another layout.
        forward_only: deploy may pass it from a site to its consumers, not from a branch back to
            its producer (views, global pooling).
        reduces: reduces the axes its ``dim`` argument names; it commutes as the table says only
            when those are spatial axes (:func:`reduces_only_spatial`).
        moves: only moves, copies or selects values (views, transposes, chunks, indexing): find
            follows the feature axis through it by value (:mod:`~fxfusion.passes.consumers`).
    """

    keeps_axis: bool = False
    sign: str | None = None
    scale: str | None = None
    shift: bool = False
    reshapes: bool = False
    forward_only: bool = False
    reduces: bool = False
    moves: bool = False


_AXIS = OpFacts(keeps_axis=True)
_VIEW = OpFacts(sign="keeps", scale="any", shift=True, reshapes=True, forward_only=True, moves=True)
_MOVE = OpFacts(sign="keeps", moves=True)  # moves or selects values: signs survive, channels may not

# The table. Keys are ATen op names where one exists (the autograd node names derive from them);
# a few Python-level ops that have no single ATen name (interpolate, dropout) use their own.
OPS: dict[str, OpFacts] = {
    # activations
    "relu": OpFacts(keeps_axis=True, sign="nonneg", scale="positive"),
    "leaky_relu": OpFacts(keeps_axis=True, scale="positive"),
    "hardtanh": OpFacts(keeps_axis=True, sign="clamped"),  # ReLU6 is hardtanh(0, 6)
    "prelu": _AXIS,
    "silu": _AXIS, "gelu": _AXIS, "hardswish": _AXIS, "mish": _AXIS, "elu": _AXIS, "tanh": _AXIS,
    "sigmoid": OpFacts(keeps_axis=True, sign="nonneg"),
    "hardsigmoid": OpFacts(keeps_axis=True, sign="nonneg"),
    "_softmax": OpFacts(sign="nonneg"),
    "exp": OpFacts(sign="nonneg"),
    "abs": OpFacts(keeps_axis=True, sign="nonneg", scale="positive"),
    "clamp": OpFacts(keeps_axis=True, sign="clamped"),
    "clamp_min": OpFacts(sign="clamped"),
    # identities
    "identity": _AXIS, "dropout": _AXIS, "contiguous": _AXIS,
    "clone": OpFacts(keeps_axis=True, sign="keeps", scale="any", shift=True),
    "_to_copy": OpFacts(keeps_axis=True, sign="keeps"),
    # pooling and resampling (max(x + b) = max(x) + b per channel: its padding is -inf)
    "max_pool1d_with_indices": OpFacts(keeps_axis=True, sign="keeps", scale="positive", shift=True),
    "max_pool2d_with_indices": OpFacts(keeps_axis=True, sign="keeps", scale="positive", shift=True),
    "avg_pool1d": OpFacts(keeps_axis=True, sign="keeps", scale="any"),
    "avg_pool2d": OpFacts(keeps_axis=True, sign="keeps", scale="any"),
    "max_pool3d_with_indices": _AXIS, "avg_pool3d": _AXIS,
    "adaptive_avg_pool2d": OpFacts(keeps_axis=True, sign="keeps", scale="any", shift=True, forward_only=True),
    "adaptive_max_pool2d": OpFacts(keeps_axis=True, sign="keeps"),
    "interpolate": _AXIS,
    "upsample_nearest1d": OpFacts(keeps_axis=True, sign="keeps", scale="any", shift=True),
    "upsample_nearest2d": OpFacts(keeps_axis=True, sign="keeps", scale="any", shift=True),
    "upsample_bilinear2d": OpFacts(keeps_axis=True, sign="keeps", scale="any"),
    # arithmetic (add and mul keep the sign only with two tensor operands: see nonneg)
    "cat": OpFacts(keeps_axis=True, sign="keeps"),
    "add": OpFacts(keeps_axis=True, sign="keeps"),
    "mul": OpFacts(keeps_axis=True, sign="keeps"),
    "sub": _AXIS, "div": _AXIS,
    # reductions (which axes they reduce: see reduces_only_spatial)
    "mean": OpFacts(sign="keeps", scale="any", shift=True, forward_only=True, reduces=True),
    "sum": _MOVE,
    # views and selections
    "view": _VIEW, "_unsafe_view": _VIEW, "_reshape_alias": _VIEW,
    "permute": _MOVE, "transpose": _MOVE, "slice": _MOVE, "select": _MOVE, "expand": _MOVE,
    "squeeze": _MOVE, "unsqueeze": _MOVE, "split": _MOVE, "split_with_sizes": _MOVE, "unbind": _MOVE,
}

# fx vocabulary -> op name. Functions and methods by identity/name; modules by isinstance.
FX_FUNCTIONS: dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "hardtanh", F.leaky_relu: "leaky_relu", F.silu: "silu",
    F.gelu: "gelu", F.hardswish: "hardswish", F.mish: "mish", F.elu: "elu", F.dropout: "dropout",
    F.interpolate: "interpolate", F.max_pool2d: "max_pool2d_with_indices", F.avg_pool2d: "avg_pool2d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", torch.clamp: "clamp", torch.abs: "abs",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.add: "add", operator.add: "add", operator.iadd: "add",
    torch.mul: "mul", operator.mul: "mul", torch.sub: "sub", operator.sub: "sub", operator.truediv: "div",
    torch.reshape: "view", torch.flatten: "view", torch.permute: "permute", torch.transpose: "transpose",
    torch.unsqueeze: "unsqueeze", torch.squeeze: "squeeze", torch.chunk: "split", torch.split: "split",
    torch.unbind: "unbind", torch.narrow: "slice", operator.getitem: "slice", torch.unflatten: "view",
    torch.mean: "mean",
}
FX_METHODS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "abs": "abs",
    "add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "sub": "sub", "div": "div",
    "contiguous": "contiguous", "clone": "clone", "float": "_to_copy", "clamp": "clamp", "clamp_": "clamp",
    "view": "view", "reshape": "view", "flatten": "view", "permute": "permute", "transpose": "transpose",
    "unsqueeze": "unsqueeze", "squeeze": "squeeze", "chunk": "split", "split": "split", "unbind": "unbind",
    "narrow": "slice", "expand": "expand", "__getitem__": "slice", "unflatten": "view", "mean": "mean",
}
FX_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "hardtanh", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu", nn.SiLU: "silu",
    nn.GELU: "gelu", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.Mish: "mish", nn.ELU: "elu", nn.Identity: "identity", nn.Upsample: "interpolate",
    nn.modules.dropout._DropoutNd: "dropout", nn.MaxPool1d: "max_pool1d_with_indices",
    nn.MaxPool2d: "max_pool2d_with_indices", nn.MaxPool3d: "max_pool3d_with_indices",
    nn.AvgPool1d: "avg_pool1d", nn.AvgPool2d: "avg_pool2d", nn.AvgPool3d: "avg_pool3d",
    nn.modules.pooling._AdaptiveAvgPoolNd: "adaptive_avg_pool2d",
    nn.modules.pooling._AdaptiveMaxPoolNd: "adaptive_max_pool2d",
}


def register_op(name: str, facts: OpFacts, *, functions: Iterable[Callable] = (), methods: Iterable[str] = (),
                modules: Iterable[type] = ()) -> None:
    """Describe a new op (or change one) for find, quantize and deploy at once.

    ``name`` is the ATen name: an autograd node ``<CamelName>Backward<N>`` resolves to it. The
    fx spellings that produce it (functions, tensor methods, module classes) map to it too.
    """
    OPS[name] = facts
    FX_FUNCTIONS.update(dict.fromkeys(functions, name))
    FX_METHODS.update(dict.fromkeys(methods, name))
    FX_MODULES.update(dict.fromkeys(modules, name))
    _BY_KEY.clear()


def unregister_op(name: str) -> OpFacts | None:
    """Forget ``name`` and every fx spelling of it; returns its facts (None if unknown)."""
    for table in (FX_FUNCTIONS, FX_METHODS, FX_MODULES):
        for k in [k for k, v in table.items() if v == name]:
            del table[k]
    _BY_KEY.clear()
    return OPS.pop(name, None)


# --- lookups ----------------------------------------------------------------------------------

_BY_KEY: dict[str, str] = {}  # normalized name -> table name (rebuilt after register_op)


def _key(name: str) -> str:
    return name.replace("_", "").lower()


def grad_fn_name(fn) -> str:
    """The op an autograd node belongs to: ``MaxPool2DWithIndicesBackward0`` → ``max_pool2d_with_indices``
    (or the bare node name, lower case, when the table does not know it)."""
    if not _BY_KEY:
        _BY_KEY.update({_key(k): k for k in OPS})
    bare = re.sub(r"Backward\d*$", "", type(fn).__name__)
    return _BY_KEY.get(_key(bare), bare.lower())


def grad_fn_facts(fn) -> OpFacts | None:
    """Facts of the op behind an autograd node; None for unknown ops and for a mean/sum that
    reduces every axis (it has no ``dim``)."""
    name = grad_fn_name(fn)
    facts = OPS.get(name)
    if facts is not None and facts.reduces and not reduces_only_spatial(fn):
        return OpFacts(sign=facts.sign)
    return facts


def node_op(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The op name of an fx node, or None."""
    if node.op == "call_function":
        return FX_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return FX_METHODS.get(node.target)
    if node.op == "call_module":
        m = modules[node.target]
        return next((name for cls, name in FX_MODULES.items() if isinstance(m, cls)), None)
    return None


# --- facts that depend on the arguments ------------------------------------------------------

def reduces_only_spatial(fn) -> bool:
    """A mean/sum over given axes, none of them the batch or feature axis (global pooling)."""
    dims = getattr(fn, "_saved_dim", None)
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    if dims is None or sizes is None:
        return False
    ndim = len(sizes)
    return ndim > 2 and all(int(d) % ndim >= 2 for d in dims)


def lower_bound_nonneg(fn) -> bool:
    """ReLU6 (hardtanh) or clamp whose saved lower bound is >= 0."""
    lo = getattr(fn, "_saved_min_val", getattr(fn, "_saved_min", None))
    try:
        return lo is not None and float(lo) >= 0
    except (TypeError, RuntimeError, ValueError):  # a tensor bound of several values
        return False


def keeps_feature_axis(node: fx.Node, modules: dict[str, nn.Module],
                       passes_through: Callable[[nn.Module], bool] | None = None) -> bool:
    """Does ``node`` keep its input's feature axis in place (find's consumer walk may pass it)?

    ``passes_through(module)`` names further modules that hand features on unchanged (the
    caller's own fusion modules and quantizers).
    """
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Flatten):
            return m.start_dim == 1
        if passes_through is not None and passes_through(m):
            return True
        if node_op(node, modules) is None:
            return _keeps_shape_without_parameters(node, m)
    if _is_mean(node):
        return _mean_keeps_features(node)
    start = _flattens_from(node)
    if start is not None:
        return start == 1  # (N, C, ...) -> (N, C·...) keeps the feature axis at 1
    op = node_op(node, modules)
    return op is not None and OPS.get(op, OpFacts()).keeps_axis


def _keeps_shape_without_parameters(node: fx.Node, m: nn.Module) -> bool:
    """A module the table does not know, kept as one call (a leaf: timm's ``DropPath``,
    torchvision's ``StochasticDepth``, whose forwards branch on ``self.training``), keeps the
    feature axis when it is obviously an elementwise pass-through: not a torch.nn module (the
    table describes those, and an unknown one such as ``nn.Softmax`` mixes along an axis), no
    parameters (so it is not a layer of its own), exactly one tensor input, and an output of that
    input's shape (``tensor_meta`` from ShapeProp). Anything else stops the walk.
    """
    if m.__module__.startswith("torch.") or next(m.parameters(), None) is not None:
        return False
    inputs = node.all_input_nodes
    if len(inputs) != 1:
        return False
    before, after = inputs[0].meta.get("tensor_meta"), node.meta.get("tensor_meta")
    return hasattr(before, "shape") and hasattr(after, "shape") and tuple(before.shape) == tuple(after.shape)


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


def nonneg(fn, memo: dict | None = None, depth: int = 0) -> bool:
    """Is the tensor made by autograd node ``fn`` non-negative by construction?"""
    memo = {} if memo is None else memo
    if fn is None or depth > 64:
        return False
    if fn in memo:
        return memo[fn]
    facts = grad_fn_facts(fn)
    sign = facts.sign if facts is not None else None
    if sign == "nonneg":
        result = True
    elif sign == "clamped":
        result = lower_bound_nonneg(fn)
    elif sign == "keeps":
        parents = [f for f, _ in fn.next_functions]
        # a python-scalar operand of add/mul leaves no parent: its sign is unknown
        if grad_fn_name(fn) in ("add", "mul") and (len(parents) < 2 or any(p is None for p in parents)):
            result = False
        else:
            live = [p for p in parents if p is not None]
            result = bool(live) and all(nonneg(p, memo, depth + 1) for p in live)
    else:
        result = False
    memo[fn] = result
    return result


# --- learnable layers: which axis they read as features ---------------------------------------

CHANNEL_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)
LAST_LAYERS = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)
_CHANNEL_FNS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.batch_norm, F.group_norm)
_LAST_FNS = (F.linear, F.layer_norm)
# Layers deploy can fold a scale into: producers take it on their output rows, readers on inputs.
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
READERS = (*PRODUCERS, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def feature_axis(kind: str, ndim: int) -> int:
    """The axis a layer of ``kind`` reads as features in an input of ``ndim`` dims."""
    return 1 if kind == "channel" else ndim - 1


def layer_kind(m: nn.Module) -> str | None:
    """``"channel"`` (reads dim 1), ``"last"`` (reads the last dim) or None (not a learnable layer)."""
    if isinstance(m, CHANNEL_LAYERS):
        return "channel"
    if isinstance(m, LAST_LAYERS):
        return "last"
    return None


def consumer_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """:func:`layer_kind` of an fx node: a module call or a functional conv/linear/norm."""
    if node.op == "call_module":
        return layer_kind(modules[node.target])
    if node.op == "call_function":
        if node.target in _CHANNEL_FNS:
            return "channel"
        if node.target in _LAST_FNS:
            return "last"
    return None
