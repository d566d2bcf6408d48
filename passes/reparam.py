"""Re-parameterizable adds: branches that a deploy-time re-parameterization merges into one conv.

RepConv (Ultralytics, RT-DETR) computes ``act(conv1(x) + conv2(x) + bn(x))`` and RepVGG (timm's
byobnet) ``act(bn1(conv_1x1(x)) + bn2(conv_kxk(x)) + bn(x))``: every branch is a linear function of
the same ``x``. Their deploy step (Ultralytics' ``fuse()`` → ``RepConv.fuse_convs()``, timm's
``reparameterize``) folds the branches into one conv and runs that instead: the add is gone, a
GABFusion placed on it disappears silently and the fused model computes something else. So find
refuses such an add unless asked (``find_fusions(..., reparameterizable=True)``).

*Linear* is decided per fx node of the unit's graph, and only these pass:

- a convolution (``nn.Conv1d/2d/3d``, ``F.conv1d/2d/3d``; not transposed) or a BatchNorm
  (``nn.BatchNorm*d``, ``F.batch_norm``: affine per channel in eval, where re-parameterizations
  happen) whose other inputs are parameters or buffers;
- an op that :data:`~fxfusion.passes.dataflow.OPS` knows as an identity in eval (``identity``,
  ``dropout``, ``contiguous``, ``clone``), and a view (``OPS`` says ``reshapes``) that keeps the shape;
- an add (alpha 1) of linear branches: RepVGG adds ``conv_1x1(x) + conv_kxk(x)`` first, then ``bn(x)``;
- a module outside torch.nn kept as one call (timm's ``BatchNormAct2d``, a leaf because its forward
  reads ``self.training``) whose own eval-mode graph is linear by these rules.

Anything else ends the branch there: an activation, pooling, a norm over the sample's own
statistics, a product, a parameter added. A node passed through must have one user (a value needed
elsewhere is not bypassed by a merge). The branches must hold a conv and a BatchNorm: a
re-parameterization merges *into a conv*, and what it folds are branches trained with their own
BatchNorm (RepVGG, RepConv, ACNet, DBB, MobileOne all are; Ultralytics' and timm's merges start by
folding each branch's BN), so ``bn1(x) + bn2(x)`` and a plain ``conv_a(x) + conv_b(x)``, which no
deploy step rewrites, stay sites. A ResNet block ``x + bn(conv(relu(...)))`` has two sources, ``x``
and the ReLU, so it stays a site too; a cat is never merged by these re-parameterizations.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxfusion.passes.dataflow import OPS, node_op
from fxfusion.passes.runtime import eval_mode
from fxfusion.passes.trace import FxTracer, keeping_state

__all__ = ["REASON", "linear_sources", "reparam_refusal"]

REASON = ("re-parameterizable: every branch is a linear function of the same input (RepConv/RepVGG style); "
          "a re-parameterization merges them into one conv and would bypass the site "
          "(find_fusions(..., reparameterizable=True) keeps it)")

_IDENTITIES = ("identity", "dropout", "contiguous", "clone")  # OPS names: the value itself, in eval
_CONV_FNS = (F.conv1d, F.conv2d, F.conv3d)
_NORM_FNS = (F.batch_norm, torch.batch_norm)


def reparam_refusal(operands: Iterable[fx.Node], modules: dict[str, nn.Module],
                    leaf_types: Iterable[type] = ()) -> str | None:
    """:data:`REASON` when the add of ``operands`` is a re-parameterizable block, else None."""
    sources, layers = linear_sources(operands, modules, tuple(leaf_types), {})
    return REASON if len(sources) == 1 and layers == {"conv", "bn"} else None


def linear_sources(roots: Iterable[fx.Node], modules: dict[str, nn.Module], leaf_types: tuple = (),
                   memo: dict | None = None) -> tuple[set[fx.Node], set[str]]:
    """The tensors ``roots`` are linear functions of (walking back through one-user linear nodes),
    and the layers on the way (``"conv"``, ``"bn"``)."""
    memo = {} if memo is None else memo
    sources, layers, stack = set(), set(), list(roots)
    while stack:
        node = stack.pop()
        step = _linear_step(node, modules, leaf_types, memo) if len(node.users) == 1 else None
        if step is None:
            sources.add(node)
        else:
            stack += step[0]
            layers |= step[1]
    return sources, layers


def _linear_step(node: fx.Node, modules: dict, leaf_types: tuple, memo: dict) -> tuple[list, set[str]] | None:
    """(the inputs ``node`` is linear in, the layers it is), or None when it is not linear."""
    inputs = node.all_input_nodes
    if node.op == "call_module":
        m = modules[node.target]
        if len(inputs) != 1:
            return None
        if type(m).__module__.startswith("torch.nn."):
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
                return inputs, {"conv"}
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return inputs, {"bn"}
            return (inputs, set()) if node_op(node, modules) in _IDENTITIES else None
        linear, layers = _module_linear(m, leaf_types, memo)
        return (inputs, layers) if linear else None
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if node.target in _CONV_FNS or node.target in _NORM_FNS:
        params_only = all(n.op == "get_attr" for n in inputs if n is not x)
        return ([x], {"conv" if node.target in _CONV_FNS else "bn"}) if params_only else None
    op = node_op(node, modules)
    if op == "add":
        return (inputs, set()) if node.kwargs.get("alpha", 1) == 1 else None
    if op in _IDENTITIES or (op in OPS and OPS[op].reshapes and _same_shape(x, node)):
        return [x], set()
    return None


def _module_linear(m: nn.Module, leaf_types: tuple, memo: dict) -> tuple[bool, set[str]]:
    """(is ``m``'s eval-mode forward linear in its first input, the layers in it); traced once."""
    if m not in memo:
        memo[m] = (False, set())  # also while tracing: a module inside itself is not linear
        try:
            with eval_mode(m), keeping_state(m):
                graph = FxTracer(leaf_types).trace(m)
        except Exception:  # noqa: BLE001 - an untraceable leaf is simply not known to be linear
            return memo[m]
        nodes = list(graph.nodes)
        out = nodes[-1].args[0]
        if nodes[0].op == "placeholder" and isinstance(out, fx.Node):
            sources, layers = linear_sources([out], dict(m.named_modules()), leaf_types, memo)
            memo[m] = (sources == {nodes[0]}, layers)
    return memo[m]


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    return hasattr(sa, "shape") and hasattr(sb, "shape") and tuple(sa.shape) == tuple(sb.shape)
