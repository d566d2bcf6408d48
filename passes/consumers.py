"""Which learnable layers read a fusion site's result, and which of its axes they read as features.

From the site, :func:`walk_consumers` follows the result through the unit's fx graph:

- through ops that keep the feature axis where it is (elementwise ops, pooling, resampling, our
  own fusion modules and quantizers: :func:`~fxfusion.passes.dataflow.keeps_feature_axis`);
- through ops that only move or select values (view/reshape, permute/transpose, flatten,
  chunk/split/unbind and indexing: :data:`~fxfusion.passes.dataflow.OPS` entries with
  ``moves=True``), and means. There the axes are tracked by *value*: each candidate feature axis of
  the site (dim 1 and the last dim) is labelled, ``ids[..., c, ...] = r_c`` with a distinct random
  ``r_c`` per channel, the same ops run on those labels (with the shapes and sizes the example
  forward saw), and a layer further on reads the site's axis ``a`` as features when every slice of
  its own feature axis holds one single label ``r_c``. A channel shuffle (view → transpose → view)
  is a permutation of the channels and passes, and so does a mean over token positions; a view
  that mixes channels with positions, or a mean over channels, leaves mixed values and does not.

It stops at a learnable layer (recorded with the site axis it reads), at the unit's output
(recorded, with the tracked ids, for the caller to follow outside the unit), or at anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion
from fxfusion.passes.dataflow import OPS, consumer_kind, feature_axis, keeps_feature_axis, node_op
from fxfusion.quant import is_quantizer

__all__ = ["mapped_axes", "walk_consumers"]



@dataclass(frozen=True)
class Ids:
    """The site's candidate feature axes, labelled channel by channel, as they look at one node."""

    values: dict[int, object]  # site axis -> the labelled tensor (or tuple of them) at this node
    labels: dict[int, Tensor]  # site axis -> the labels its channels were given at the site


def walk_consumers(start: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[tuple[str, int]],
                                                                           list[tuple[fx.Node, Ids | None]]]:
    """``[(layer label, site axis it reads)]`` and ``[(node at the unit output, ids or None)]``.

    ``ids`` None means the values reached the output in place (the site's axes are the output's).
    """
    found: list[tuple[str, int]] = []
    outputs: list[tuple[fx.Node, Ids | None]] = []
    seen, queue = {start}, [(start, None)]
    while queue:
        cur, ids = queue.pop(0)
        for user in cur.users:
            if user.op == "output":
                outputs.append((cur, ids))
                continue
            kind = consumer_kind(user, modules)
            if kind is not None and hasattr(_meta(cur), "shape"):
                axis = feature_axis(kind, len(_meta(cur).shape))
                found += [(_label(user), axis)] if ids is None else [(_label(user), a) for a in mapped_axes(ids, axis)]
                continue
            if user in seen:
                continue
            keeps = keeps_feature_axis(user, modules, _passes_features)
            if keeps and (ids is None or _same_shape(user, cur)):
                seen.add(user)
                queue.append((user, ids))
            elif _moves(user, modules) or (keeps and _replayable(user, modules)):
                # labels moved, or pooled/resized after a move (an average or a copy of one label is it)
                moved = _move(user, cur, ids if ids is not None else _numbered(start), modules)
                if moved is not None:
                    seen.add(user)
                    queue.append((user, moved))
    return found, outputs


def mapped_axes(ids: Ids, axis: int) -> list[int]:
    """The site axes whose channels lie one per slice along ``axis`` of the tracked tensors."""
    return [site_axis for site_axis, t in ids.values.items()
            if isinstance(t, Tensor) and t.dim() > axis and _single_source(t, axis, ids.labels[site_axis])]


def _labels(n: int, axis: int) -> Tensor:
    """Distinct labels in [1, 2) for the n channels of a site axis (the same for every call): an
    average of several of them is almost surely none of them."""
    return torch.rand(n, generator=torch.Generator().manual_seed(1000 + axis), dtype=torch.float64) + 1.0


def _single_source(t: Tensor, axis: int, labels: Tensor) -> bool:
    """Every slice along ``axis`` holds one value, and each such value is one channel's label."""
    rows = t.movedim(axis, 0).reshape(t.shape[axis], -1)
    if not rows.numel() or not bool(torch.isclose(rows, rows[:, :1], rtol=1e-12, atol=0).all()):
        return False
    heads = rows[:, 0]
    is_label = torch.isclose(heads[:, None], labels[None, :], rtol=1e-12, atol=0).any(1)
    # slices of other tensors joined on the way (a cat with the site's channels) hold the filler
    return bool((is_label | (heads == _FILLER)).all()) and bool(is_label.any())


_FILLER = -1.0  # the values of the other tensors an op joins with the labelled one (never a label)


def _numbered(start: fx.Node) -> Ids:
    shape = tuple(_meta(start).shape)
    axes = {1, len(shape) - 1} if len(shape) >= 2 else set()
    labels = {a: _labels(shape[a], a) for a in axes}
    values = {}
    for a in axes:
        view = [1] * len(shape)
        view[a] = -1
        values[a] = labels[a].view(view).expand(shape).contiguous()
    return Ids(values, labels)


def _moves(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops replayed on the labels: those that only move values, and means (an average of one label
    is that label; of several, none)."""
    op = node_op(node, modules)
    return op is not None and (op == "mean" or getattr(OPS.get(op), "moves", False))


def _replayable(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A shape-changing op that keeps the feature axis and can run on labels: a function or method
    (pooling, interpolate, flatten, mean), or a torch.nn module without parameters or buffers."""
    if node.op == "call_module":
        m = modules[node.target]
        return (m.__module__.startswith("torch.nn") and not any(True for _ in m.parameters())
                and not any(True for _ in m.buffers()))
    return node.op in ("call_function", "call_method")


def _move(node: fx.Node, source: fx.Node, ids: Ids, modules: dict[str, nn.Module]) -> Ids | None:
    """Run ``node`` on the labelled tensors in place of ``source`` (other arguments as the example
    forward saw them); None when an argument is unknown or the op fails for every axis."""
    out = {}
    for axis, value in ids.values.items():
        try:
            args = _concrete(node.args, source, value)
            kwargs = _concrete(node.kwargs, source, value)
            if node.op == "call_method":
                result = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                result = modules[node.target](*args, **kwargs)
            else:
                result = node.target(*args, **kwargs)
            # contiguous copies: a later .view() must not fail on a transposed layout
            out[axis] = (result.contiguous() if isinstance(result, Tensor)
                         else type(result)(r.contiguous() if isinstance(r, Tensor) else r for r in result))
        except Exception:  # noqa: BLE001 - an op we cannot replay ends the walk there
            continue
    return Ids(out, ids.labels) if out else None


class _Unknown(Exception):
    pass


def _concrete(arg, source: fx.Node, value):
    if isinstance(arg, fx.Node):
        if arg is source:
            return value
        if "value" in arg.meta:
            return arg.meta["value"]
        meta = arg.meta.get("tensor_meta")
        if hasattr(meta, "shape"):  # another tensor joined on the way: filler of its shape
            return torch.full(tuple(meta.shape), _FILLER, dtype=torch.float64)
        raise _Unknown(arg.name)
    if isinstance(arg, (list, tuple)):
        return type(arg)(_concrete(a, source, value) for a in arg)
    if isinstance(arg, dict):
        return {k: _concrete(v, source, value) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(*(_concrete(x, source, value) for x in (arg.start, arg.stop, arg.step)))
    return arg


def _same_shape(node: fx.Node, source: fx.Node) -> bool:
    a, b = _meta(node), _meta(source)
    return hasattr(a, "shape") and hasattr(b, "shape") and tuple(a.shape) == tuple(b.shape)


def _passes_features(m: nn.Module) -> bool:
    """Our own modules hand features on unchanged: fusion sites and quantizers."""
    return isinstance(m, (GABFusion, DeployedFusion)) or is_quantizer(m)


def _label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))


def _meta(node: fx.Node):
    return node.meta.get("tensor_meta")
