"""Tracing front end: the largest torch.fx-traceable pieces of any model.

Real detectors do not trace as a whole (iterating a ``chunk`` result, data-dependent
shape checks, ``self.training`` branches). :func:`trace_units` therefore tries the whole
model first and, where that fails, descends into the children and traces each subtree
that can be traced on its own. Containers (Sequential, ModuleList, ModuleDict) are never
units: parents iterate and index them, so we only look inside. Everything that could not
be traced is reported with its path, class and reason, never skipped silently.

Mode-dependent children. A module whose *own* forward (or a method of its own class that the
forward calls) reads ``self.training`` -- timm's ``DropPath`` and ``BatchNormAct2d``, torchvision's
``StochasticDepth`` -- is kept as one ``call_module`` leaf in its parent's graph: it runs as it is,
in whatever mode the model is in, so the parent traces and its own cats and adds are examined.
Each such leaf is then tried as a unit of its own, like any other subtree. A unit is traced in
both modes when its own forward reads ``training`` (or when a traced-through forward's source
cannot be read); if the two graphs differ it is refused as mode-dependent
(:class:`ModeDependentError`) and its children are traced instead. A mode-dependent module whose
graphs join no two values (no cat, no add of two graph values: a ``DropPath``) holds nothing to
examine and is not listed.

Iterating a proxy. ``list(x.chunk(2, 1))`` (Ultralytics' C2f) makes plain torch.fx raise "Proxy
object cannot be iterated". In :class:`FxTracer` the result of ``chunk``/``torch.chunk`` with a
constant count, and of ``split``/``torch.split`` with a list of sizes, has a length and iterates
as its pieces (``getitem`` nodes: the graph of ``a, b = x.chunk(2, 1)``); any other proxy still
refuses to be iterated.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion
from fxfusion.passes.dataflow import node_op
from fxfusion.passes.runtime import failure_reason, join
from fxfusion.quant.layers import QUANT_LAYERS

__all__ = [
    "CONTAINERS",
    "FxTracer",
    "ModeDependentError",
    "TraceResult",
    "TracedUnit",
    "Untraceable",
    "instance_forward",
    "keeping_state",
    "mode_leaves",
    "none_arguments",
    "piece_count",
    "reads_training",
    "register_leaf",
    "shallow_trace",
    "trace_units",
]

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# Module classes that passes must see as single calls: our own fusion modules and quantized layers
# (their forwards are ours and hold no fusion of the user's). register_leaf adds more.
_LEAF_TYPES: list[type] = [GABFusion, DeployedFusion, *QUANT_LAYERS.values()]


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
    ``call_module`` nodes (containers are looked through, since parents index them). A deep
    trace keeps torch.nn layers, our own modules and ``leaf_types`` as leaves (:meth:`is_opaque`),
    and also every child whose own forward reads ``self.training`` (:func:`reads_training`),
    unless ``through_training``: then it traces through them too, and :func:`trace_module`
    compares the two modes' graphs.

    The result of a ``chunk``/``split`` whose piece count its arguments fix (:func:`piece_count`)
    has a length and can be iterated.
    """

    def __init__(self, leaf_types: Iterable[type] = (), shallow: bool = False, through_training: bool = False) -> None:
        super().__init__()
        self.leaf_types = tuple(_LEAF_TYPES) + tuple(leaf_types)
        self.shallow = shallow
        self.through_training = through_training

    def again(self) -> FxTracer:
        """A fresh tracer with the same options (a tracer traces once)."""
        return FxTracer(self.leaf_types, self.shallow, self.through_training)

    def trace(self, root: nn.Module | Callable, concrete_args: dict | None = None) -> fx.Graph:
        """torch.fx traces ``type(root).forward``; a module whose instance ``forward`` is another
        method of its class (the fused form of a YOLO block: ``m.forward = m.forward_fuse``) is
        traced through the method that actually runs."""
        self.traced_func_name = instance_forward(root) or "forward"
        return super().trace(root, concrete_args)

    def is_opaque(self, m: nn.Module, qualname: str) -> bool:
        """A leaf that holds no fusion of the user's: torch.nn layers, our modules, ``leaf_types``."""
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        if self.shallow:
            return not isinstance(m, CONTAINERS)
        return super().is_leaf_module(m, qualname) or (not self.through_training and reads_training(type(m)) is True)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        n = piece_count(node)
        return _Pieces(node, self, n) if n is not None else super().proxy(node)

    def iter(self, obj: fx.Proxy) -> Iterator:
        n = piece_count(obj.node)
        if n is None:
            return super().iter(obj)  # raises TraceError: the count is not known at trace time
        return iter([obj[i] for i in range(n)])


class _Pieces(fx.Proxy):
    """The proxy of a chunk/split whose piece count is known: ``len()`` and ``list()`` work
    (``list()`` asks for the length before it iterates).

    Iterating makes a ``getitem`` node for every piece, so if at run time the op returns fewer
    pieces than assumed (``torch.chunk`` can: ``chunk(4)`` of 5 channels gives 3 pieces of 2, 2
    and 1), running the graph raises IndexError at the missing piece; it never computes something
    else.
    """

    def __init__(self, node: fx.Node, tracer: fx.Tracer, n: int) -> None:
        super().__init__(node, tracer)
        self._fxfusion_len = n

    def __len__(self) -> int:
        return self._fxfusion_len


_CHUNK_FUNCTIONS = {torch.chunk: "chunk", torch.Tensor.chunk: "chunk", torch.split: "split",
                    torch.functional.split: "split", torch.Tensor.split: "split"}


def instance_forward(module: object) -> str | None:
    """Name of the class method bound as ``module``'s own ``forward`` attribute, if it has one."""
    bound = getattr(module, "__dict__", {}).get("forward")
    func = getattr(bound, "__func__", None)
    if getattr(bound, "__self__", None) is not module or func is None:
        return None
    name = func.__name__
    return name if getattr(type(module), name, None) is func else None


def piece_count(node: fx.Node) -> int | None:
    """How many tensors ``node`` returns, when its arguments fix that at trace time; else None.

    ``x.chunk(n, dim)`` / ``torch.chunk(x, n, dim)`` with an int ``n``: ``n`` (torch may return
    fewer: see :class:`_Pieces`). ``x.split(sizes, dim)`` / ``torch.split(x, sizes, dim)`` /
    ``x.split_with_sizes(sizes)`` with a list of sizes: ``len(sizes)`` (torch returns exactly that
    many or raises). A split by an int size (the count depends on the shape), ``unbind`` and
    anything else: None.
    """
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = _CHUNK_FUNCTIONS.get(node.target)
    else:
        return None
    if name == "chunk":
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
    if name in ("split", "split_with_sizes"):
        keys = ("split_size", "split_size_or_sections", "split_sizes")
        sizes = node.args[1] if len(node.args) > 1 else next((node.kwargs[k] for k in keys if k in node.kwargs), None)
        return len(sizes) if isinstance(sizes, (list, tuple)) else None
    return None


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
    opaque = FxTracer(leaf_types).is_opaque

    def visit(path: str, module: nn.Module) -> None:
        if isinstance(module, CONTAINERS):
            for name, child in module.named_children():
                visit(join(path, name), child)
            return
        if path and opaque(module, path):
            return  # torch.nn layers and our own leaves hold no fusion of their own
        concrete = concrete_args if not path else None
        try:
            gm = _through_training(module, leaf_types, concrete) or trace_module(module, FxTracer(leaf_types), concrete)
        except Exception as e:  # noqa: BLE001 - any tracing failure is reported, then we descend
            if not (isinstance(e, ModeDependentError) and not e.joins):  # a DropPath: nothing to examine
                result.untraceable.append(Untraceable(path or "<root>", type(module).__name__, failure_reason(e)))
            for name, child in module.named_children():
                visit(join(path, name), child)
            return
        result.units.append(TracedUnit(path, module, gm))
        # children kept as leaves because their own forward reads self.training: units of their own
        for target in mode_leaves(gm.graph, module, leaf_types):
            visit(join(path, target), module.get_submodule(target))

    visit("", model)
    return result


def _through_training(module: nn.Module, leaf_types: tuple, concrete_args: dict | None) -> fx.GraphModule | None:
    """One deep graph through the children whose forward reads ``training``, when it is the same
    graph in both modes (the branches they take do not change it: a DropPath of rate 0, a
    dropout-free DenseNet layer); None when there is no such child, or the graphs differ, or the
    trace fails. It saves tracing each such child as a unit of its own, in both modes."""
    tracer = FxTracer(leaf_types, through_training=True)
    if not any(reads_training(type(m)) is True for m in _traced_through(module, tracer)):
        return None
    try:
        return trace_module(module, tracer, concrete_args)
    except Exception:  # noqa: BLE001 - the mode-dependent children are then traced on their own
        return None


def mode_leaves(graph: fx.Graph, root: nn.Module, leaf_types: Iterable[type] = ()) -> list[str]:
    """Targets of the ``call_module`` nodes of ``root``'s deep graph that are leaves only because
    their own forward reads ``self.training`` (in graph order, each once)."""
    opaque = FxTracer(leaf_types).is_opaque
    targets = dict.fromkeys(n.target for n in graph.nodes if n.op == "call_module")
    return [t for t in targets if not opaque(root.get_submodule(t), t)]


def shallow_trace(module: nn.Module, leaf_types: Iterable[type] = (),
                  list_args: Sequence[int | None] = (), none_args: Sequence[str] = ()) -> fx.Graph:
    """Graph of ``module``'s own forward only: every non-container child is a leaf.

    ``list_args[i] = n`` says positional argument ``i`` is a list of ``n`` tensors (as seen
    at run time): it is traced as ``n`` placeholders, so ``len()`` and indexing work.
    ``none_args`` are arguments that are None in every call the model makes: the graph is
    specialized to that (torch.fx checks it at run time), as :func:`none_arguments` explains.
    Returns the bare graph (no GraphModule: the rewrite only edits and re-emits it).
    """
    concrete = {**(_list_placeholders(module, list_args) or {}), **dict.fromkeys(none_args)}
    return trace_module(module, FxTracer(leaf_types, shallow=True), concrete or None, graph_only=True)


def none_arguments(module: nn.Module, args: tuple, kwargs: dict) -> set[str]:
    """Names of ``module.forward``'s arguments that are None in this call (given or by default).

    A forward such as ``if scale is not None: x = x * scale`` traces with ``scale`` as a proxy,
    so the traced graph multiplies by it even when the model passes None. Tracing with
    ``concrete_args={"scale": None}`` gives the graph the model really runs, and torch.fx
    inserts a check that fails loudly if a later call passes something else.
    """
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return set()
    bound.apply_defaults()
    return {name for name, value in bound.arguments.items() if value is None}


def _list_placeholders(module: nn.Module, list_args: Sequence[int | None]) -> dict | None:
    if not any(n is not None for n in list_args):
        return None
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {params[i].name: [fx.PH] * n for i, n in enumerate(list_args) if n is not None and i < len(params)}


def expect_none(value, message: str) -> None:
    """The run-time check of an argument the trace specialized to None (see :func:`none_arguments`)."""
    if value is not None:
        raise AssertionError(message)


def _own_none_checks(graph: fx.Graph) -> fx.Graph:
    """torch.fx checks a None-specialized argument with its own ``_assert_is_none``, an fx-wrapped
    function: code generated from such a graph registers it for patching under a dotted name that
    later traces cannot find (``KeyError`` in every trace after it, torch 2.14). Our plain function
    checks the same."""
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            node.target = expect_none
    return graph


def trace_module(module: nn.Module, tracer: FxTracer, concrete_args: dict | None = None,
                 graph_only: bool = False) -> fx.GraphModule | fx.Graph:
    """Trace in the current mode; if the graph may depend on ``training`` (:func:`_compare_modes`),
    also trace the other mode and refuse (ModeDependentError) when the graphs differ."""
    with keeping_state(module):
        graph = _own_none_checks(tracer.trace(module, concrete_args))
        if _compare_modes(module, tracer):
            was_training = module.training
            try:
                module.train(not was_training)
                other = tracer.again().trace(module, concrete_args)
            finally:
                module.train(was_training)
            if other.python_code("self").src != graph.python_code("self").src:
                raise ModeDependentError(
                    "forward differs between train and eval mode (a self.training branch); left as is",
                    joins=_joins_values(graph) or _joins_values(other))
    return graph if graph_only else fx.GraphModule(tracer.root, graph, type(module).__name__)


@contextlib.contextmanager
def keeping_state(module: nn.Module) -> Iterator[None]:
    """Tracing runs the root's forward on the real module: afterwards every module of the subtree
    has its own attributes and its buffers' values back.

    An in-place buffer update (timm's BatchNormAct2d counts ``num_batches_tracked.add_(1)`` in
    training) would change the model; an attribute the forward assigns (``self.device = x.device``
    in Ultralytics' RT-DETR loss, a cached shape) would keep an fx Proxy, which breaks
    ``deepcopy`` and pickling of the user's model later.
    """
    saved = [(b, b._version, b.detach().clone()) for b in module.buffers()]
    attributes = [(m, dict(vars(m))) for m in module.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, version, value in saved:
                if b._version != version:
                    b.copy_(value)
        for m, before in attributes:
            if vars(m).keys() != before.keys() or any(vars(m)[k] is not v for k, v in before.items()):
                vars(m).clear()
                vars(m).update(before)


class ModeDependentError(RuntimeError):
    """The module's traced graph depends on ``self.training``.

    ``joins``: whether the module's own forward, in either mode, joins two values (a cat, or an
    add of two graph values); without one there is nothing of its own for find to examine (its
    children are tried one by one anyway).
    """

    def __init__(self, msg: str, joins: bool = True) -> None:
        super().__init__(msg)
        self.joins = joins


def _joins_values(graph: fx.Graph) -> bool:
    """Does the root's own forward (not a child traced through: children are examined on their
    own when the root is refused) cat, or add two graph values?"""
    for node in graph.nodes:
        own = not node.meta.get("nn_module_stack")
        op = node_op(node, {}) if own and node.op in ("call_function", "call_method") else None
        if op == "cat" or (op == "add" and sum(isinstance(a, fx.Node) for a in (*node.args, *node.kwargs.values()))
                           >= 2):
            return True
    return False


def _compare_modes(module: nn.Module, tracer: FxTracer) -> bool:
    """Must the other mode be traced too? When the root's own forward reads ``training`` or its
    source is unknown, or (deep trace) a forward traced through has unknown source. Children whose
    forward reads ``training`` are leaves of a deep trace: they cannot make the graphs differ."""
    if reads_training(type(module)) is not False:
        return True
    if tracer.shallow:  # in a shallow trace only the root's own forward runs symbolically
        return False
    # unknown source, or a training reader traced through (through_training)
    return any(reads_training(type(m)) is not False for m in _traced_through(module, tracer))


def _traced_through(module: nn.Module, tracer: FxTracer) -> Iterator[nn.Module]:
    """The descendants whose own forward a deep trace of ``module`` with ``tracer`` runs
    symbolically: not leaves, and not containers (looked through, never called)."""
    stack = list(module.named_children())
    while stack:
        path, m = stack.pop()
        if not isinstance(m, CONTAINERS):
            if tracer.is_leaf_module(m, path):
                continue
            yield m
        stack += [(join(path, name), c) for name, c in m.named_children()]


@functools.lru_cache(maxsize=None)
def reads_training(cls: type) -> bool | None:
    """Does ``cls``'s own forward read ``training``? None when its source cannot be read.

    Looks at the code of ``forward`` (not at comments or docstrings) and of the methods it calls
    as ``self.name(...)`` or ``super().name(...)``, transitively: an attribute ``.training`` or the
    string ``"training"`` (``getattr(self, "training")``) counts. Child modules it calls are not
    its own forward: they are judged on their own.
    """
    todo: list[tuple[str, type | None]] = [("forward", None)]
    seen: set[tuple[str, type | None]] = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        found = _method(cls, *key)
        if found is None:
            continue
        owner, fn = found
        if not inspect.isfunction(inspect.unwrap(fn)):
            if key == ("forward", None):
                return None  # a forward that is not Python code of its own: be safe
            continue  # not a method: a child module or an attribute
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            return None  # unknown source: be safe
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "training") or (
                    isinstance(node, ast.Constant) and node.value == "training"):
                return True
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = node.func.value
                if isinstance(target, ast.Name) and target.id == "self":
                    todo.append((node.func.attr, None))
                elif isinstance(target, ast.Call) and isinstance(target.func, ast.Name) and target.func.id == "super":
                    todo.append((node.func.attr, owner))
    return False


def _method(cls: type, name: str, after: type | None) -> tuple[type, object] | None:
    """Attribute ``name`` of ``cls`` and the class that defines it, looked up in the MRO (past
    ``after``, as ``super()`` does); None when no class defines it, or only ``nn.Module``'s own
    machinery."""
    mro = cls.__mro__
    if after is not None and after in mro:
        mro = mro[mro.index(after) + 1:]
    for klass in mro:
        if name in vars(klass):
            if klass is nn.Module or klass is object:
                return None
            fn = vars(klass)[name]
            return klass, getattr(fn, "__func__", fn)  # staticmethod, classmethod: the function
    return None


