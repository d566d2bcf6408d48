"""Running a user's model once for analysis, and the module-tree helpers every pass shares.

Several passes learn about a model by running it on example inputs with hooks attached
(find: which outputs reach which layers; quantize: input signs, first and last layers; deploy:
the dataflow around each site; verify: the PyTorch side). They all need the same care: eval mode
for the run and the user's per-module flags back afterwards, hooks removed even on failure, and a
failure named with the inputs that caused it. That is :func:`eval_mode`, :func:`removing` and
:func:`run_example`; the rest are the small path and output helpers the passes share.
"""

from __future__ import annotations

import gc
import re
import types
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = [
    "compile_regex",
    "describe_inputs",
    "eval_mode",
    "failure_reason",
    "join",
    "is_framework_wrapper",
    "leaves",
    "network",
    "normalize_inputs",
    "paused_gc",
    "removing",
    "run_example",
    "set_submodule",
    "tensors",
    "tracked",
    "unwrap",
]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off while a pass runs (also as a decorator).

    A pass makes many objects that live until it returns (fx graphs and nodes, module copies),
    and every collection of the oldest generation scans all of them again. Measured alone on
    ``benchmarks/passes.py``'s 5,002-node chain: rewrite 4.4 s -> 3.6 s, quantize 1.41 s -> 0.89 s.
    Tensors are freed by reference counting either way; the few cycles made meanwhile are
    collected after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def normalize_inputs(example_inputs: Tensor | Sequence) -> tuple:
    """One tensor, or a tuple/list of positional inputs, as a tuple."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a Tensor or a tuple of inputs, got {type(example_inputs).__name__}")


def describe_inputs(inputs: tuple) -> str:
    """``(2, 3, 64, 64) float32, int`` for error messages: each input's shape and dtype (or type)."""
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, Tensor)
                     else type(x).__name__ for x in inputs)


def leaves(obj: Any) -> list:
    """Flatten nested tuples/lists/dict values in order (the same order for fx args and run-time values).

    >>> leaves((1, [2, {"a": 3}]))
    [1, 2, 3]
    """
    if isinstance(obj, (list, tuple)):
        return [leaf for o in obj for leaf in leaves(o)]
    if isinstance(obj, dict):
        return [leaf for o in obj.values() for leaf in leaves(o)]
    return [obj]


def tensors(obj: Any) -> list[Tensor]:
    """The tensors of a nested output, in :func:`leaves` order (an exported graph's outputs)."""
    return [x for x in leaves(obj) if isinstance(x, Tensor)]


def join(prefix: str, name: str) -> str:
    """Module path ``prefix.name``, where either part may be the root's empty path.

    >>> join("", "conv"), join("model.1", "cv"), join("model.1", "")
    ('conv', 'model.1.cv', 'model.1')
    """
    if not prefix:
        return name
    return f"{prefix}.{name}" if name else prefix


def compile_regex(pattern: str | None, arg: str) -> re.Pattern | None:
    """``re.compile(pattern)`` for a user's ``arg=`` option (None stays None); a bad pattern names the option."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{arg}={pattern!r} is not a valid regular expression: {e}") from e


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` (not the root itself) by ``new``."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor and attribute value with ``model``.

    For scratch work that replaces modules, tensors and attributes (``conv.weight = new``,
    ``m.enabled = False``, a hook) but never writes into a shared value: each module is a new
    object with its own ``__dict__`` and its own copies of the containers in it (children,
    parameters, buffers, hooks), so nothing done to the copy's structure reaches ``model``. It
    costs one shallow copy per module (a ``deepcopy`` also walks every attribute).
    """
    done: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) in done:  # a module reachable twice stays one module
            return done[id(m)]
        new = m.__class__.__new__(m.__class__)
        for k, v in m.__dict__.items():
            if isinstance(v, (dict, list, set)):
                v = v.copy()
            elif isinstance(v, types.MethodType) and v.__self__ is m:  # m.forward = m.forward_fuse
                v = types.MethodType(v.__func__, new)
            new.__dict__[k] = v
        done[id(m)] = new
        new._modules = {k: (clone(c) if c is not None else None) for k, c in m._modules.items()}
        return new

    return clone(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel wrappers."""
    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def network(model: object, where: str, *, edits: bool = False) -> nn.Module:
    """The network a pass works on, checked.

    Ultralytics' ``YOLO``/``RTDETR`` objects are ``nn.Module`` wrappers around the network in
    ``.model`` (plus a predictor, a trainer and locks). A pass that only reads (find, export,
    verify) works on ``.model``. A pass that returns a new model (``edits=True``) refuses the
    wrapper and says how to put its result back, since ``yolo.train()`` would rebuild the network
    from its yaml and drop the result.
    """
    if is_framework_wrapper(model):
        if edits:
            raise TypeError(
                f"{where} got an Ultralytics {type(model).__name__} object; pass its network and assign the "
                f"result back (yolo.model = fxfusion.{where}(yolo.model, ...)). To train it with Ultralytics' "
                "trainer use fxfusion.integrations.ultralytics.train: yolo.train() rebuilds the network from "
                "its yaml and drops what fxfusion did")
        return model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} expects a torch.nn.Module, got {type(model).__name__}")
    return model


def is_framework_wrapper(obj: object) -> bool:
    """Ultralytics' ``Model`` (``YOLO``, ``RTDETR``, ...), recognised without importing Ultralytics."""
    return isinstance(getattr(obj, "model", None), nn.Module) and any(
        c.__module__ == "ultralytics.engine.model" and c.__name__ == "Model" for c in type(obj).__mro__)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; every module's own ``training`` flag restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def removing(handles: Iterable) -> Iterator[None]:
    """Remove hook ``handles`` when the block ends, however it ends."""
    handles = list(handles)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def failure_reason(e: BaseException) -> str:
    """``TypeError: first line of the message`` (at most 160 characters), for a refusal's reason."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(e).__name__}: {msg}"


def tracked(inputs: tuple) -> tuple:
    """Copies of the floating inputs that require grad, so that a forward records its autograd graph."""
    return tuple(x.detach().clone().requires_grad_(True) if isinstance(x, Tensor) and x.is_floating_point()
                 else x for x in inputs)


def run_example(model: nn.Module, inputs: tuple, *, grad: bool = False) -> Any:
    """One eval-mode forward for analysis; the model's modes are restored.

    With ``grad=True`` the forward records autograd history (the passes read the graph through
    ``grad_fn``; give it :func:`tracked` inputs). A failure is re-raised as a ValueError that names
    the inputs: almost always they do not fit the model.
    """
    try:
        with eval_mode(model), torch.set_grad_enabled(grad):
            return model(*inputs)
    except Exception as e:
        raise ValueError(f"{type(model).__name__} failed on the example inputs ({describe_inputs(inputs)}): {e}. "
                         "Pass inputs of the shape and dtype the model expects.") from e
