"""Tracing front end: the largest torch.fx-traceable pieces of any model.

Real detectors do not trace as a whole (iterating a ``chunk`` result, data-dependent
shape checks, ``self.training`` branches). :func:`trace_units` therefore tries the whole
model first and, where that fails, descends into the children and traces each subtree
that can be traced on its own. Containers (Sequential, ModuleList, ModuleDict) are never
units: parents iterate and index them, so we only look inside. Everything that could not
be traced is reported with its path, class and reason, never skipped silently.

A module whose forward reads ``self.training`` is traced in both modes; if the two graphs
differ it is reported as mode-dependent and its children are traced instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from fxfusion.gabfusion import GABFusion
from fxfusion.quant.layers import QUANT_LAYERS

__all__ = [
    "CONTAINERS",
    "FxTracer",
    "TraceResult",
    "TracedUnit",
    "Untraceable",
    "register_leaf",
    "shallow_trace",
    "trace_units",
]

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Module classes that passes must see as single calls (our own modules). Extended by
# the quantize pass for its quantized layers.
_LEAF_TYPES: list[type] = [GABFusion, *QUANT_LAYERS.values()]


def register_leaf(cls: type) -> type:
    """Make every later trace keep ``cls`` as one ``call_module`` node (usable as a decorator)."""
    if cls not in _LEAF_TYPES:
        _LEAF_TYPES.append(cls)
    return cls


@dataclass(frozen=True)
class Untraceable:
    """A module torch.fx could not trace, with the reason."""

    path: str
    cls: str
    reason: str


@dataclass(frozen=True)
class TracedUnit:
    """A traceable subtree: its path in the model, the module and its (deep) graph."""

    path: str
    module: nn.Module
    graph_module: fx.GraphModule


@dataclass
class TraceResult:
    units: list[TracedUnit] = field(default_factory=list)
    untraceable: list[Untraceable] = field(default_factory=list)


class FxTracer(fx.Tracer):
    """torch.fx tracer with our leaves; ``shallow=True`` also keeps every child as a leaf.

    A shallow trace records only the traced module's own forward: children become
    ``call_module`` nodes (containers are looked through, since parents index them).
    """

    def __init__(self, leaf_types: Iterable[type] = (), shallow: bool = False) -> None:
        super().__init__()
        self.leaf_types = tuple(_LEAF_TYPES) + tuple(leaf_types)
        self.shallow = shallow

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        if self.shallow:
            return not isinstance(m, CONTAINERS)
        return super().is_leaf_module(m, qualname)


def trace_units(
    model: nn.Module,
    concrete_args: dict | None = None,
    leaf_types: Iterable[type] = (),
) -> TraceResult:
    """Trace ``model`` whole, or else its largest traceable subtrees.

    Args:
        model: any module.
        concrete_args: passed to torch.fx for the root (e.g. ``{"augment": False}``).
        leaf_types: extra module classes to keep opaque.

    Returns:
        A :class:`TraceResult` of units (deep graphs, nn leaves kept as calls) and the
        modules that could not be traced, with reasons.
    """
    leaf_types = tuple(leaf_types)
    result = TraceResult()
    tracer = FxTracer(leaf_types)

    def visit(path: str, module: nn.Module) -> None:
        if isinstance(module, CONTAINERS):
            for name, child in module.named_children():
                visit(_join(path, name), child)
            return
        if path and tracer.is_leaf_module(module, path):
            return  # torch.nn layers and our own leaves hold no fusion of their own
        try:
            gm = trace_module(module, FxTracer(leaf_types), concrete_args if not path else None)
        except Exception as e:  # noqa: BLE001 - any tracing failure is reported, then we descend
            result.untraceable.append(Untraceable(path or "<root>", type(module).__name__, _reason(e)))
            for name, child in module.named_children():
                visit(_join(path, name), child)
            return
        result.units.append(TracedUnit(path, module, gm))

    visit("", model)
    return result


def shallow_trace(module: nn.Module, leaf_types: Iterable[type] = (),
                  list_args: Sequence[int | None] = ()) -> fx.Graph:
    """Graph of ``module``'s own forward only: every non-container child is a leaf.

    ``list_args[i] = n`` says positional argument ``i`` is a list of ``n`` tensors (as seen
    at run time): it is traced as ``n`` placeholders, so ``len()`` and indexing work.
    Returns the bare graph (no GraphModule: the rewrite only edits and re-emits it).
    """
    return trace_module(module, FxTracer(leaf_types, shallow=True), _list_placeholders(module, list_args),
                        graph_only=True)


def _list_placeholders(module: nn.Module, list_args: Sequence[int | None]) -> dict | None:
    if not any(n is not None for n in list_args):
        return None
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {params[i].name: [fx.PH] * n for i, n in enumerate(list_args) if n is not None and i < len(params)}


def trace_module(module: nn.Module, tracer: FxTracer, concrete_args: dict | None = None,
                 graph_only: bool = False) -> fx.GraphModule | fx.Graph:
    """Trace in the current mode; if any forward in the subtree reads ``training``,
    also trace the other mode and refuse (ModeDependentError) when the graphs differ."""
    graph = tracer.trace(module, concrete_args)
    if _reads_training(module, tracer):
        was_training = module.training
        try:
            module.train(not was_training)
            other = FxTracer(tracer.leaf_types, tracer.shallow).trace(module, concrete_args)
        finally:
            module.train(was_training)
        if other.python_code("self").src != graph.python_code("self").src:
            raise ModeDependentError(
                "forward differs between train and eval mode (a self.training branch); left as is")
    return graph if graph_only else fx.GraphModule(tracer.root, graph, type(module).__name__)


class ModeDependentError(RuntimeError):
    """The module's traced graph depends on ``self.training``."""


def _reads_training(module: nn.Module, tracer: FxTracer) -> bool:
    """Cheap check before a second trace: does any traced-through forward mention ``training``?"""
    if tracer.shallow:  # in a shallow trace only the root's own forward runs symbolically
        return _forward_mentions_training(type(module))
    seen: set[type] = set()
    for path, m in module.named_modules():
        cls = type(m)
        if cls in seen or (path and tracer.is_leaf_module(m, path)):
            continue
        seen.add(cls)
        if _forward_mentions_training(cls):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _forward_mentions_training(cls: type) -> bool:
    try:
        return "training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True  # unknown source: be safe, compare both modes


def _reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(e).__name__}: {msg}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
