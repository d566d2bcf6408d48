"""The quantize pass: fake quantizers on every Conv and Linear, for QAT with any technique.

Before / after, per layer::

    y = conv(x)                       ->  y = conv(act_quant(x), weight_quant(weight), bias)

Placement rules:

- **Weights** of every ``Conv1d``/``Conv2d``/``Linear``: per output channel (axis 0), signed,
  symmetric.
- **Input activations** of those layers: per tensor. *Unsigned* when the input is provably
  non-negative: we follow the input's autograd graph from one example forward and accept
  ReLU/ReLU6/sigmoid outputs and what pooling, upsampling, cat, add and views make of them.
  Otherwise *signed* (after SiLU, GELU, a LayerNorm or GABFusion): each method then uses its
  signed or asymmetric grid (see its quantizer's docstring).
- **First and last layers** (the layers that read the model input, and the layers whose
  output reaches a model output without another learnable layer) use ``first_last_bits``
  (8 by default) for weights and inputs.
- **BatchNorm** that directly follows a conv is folded into it *before* QAT
  (``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β`` with the running statistics, via
  ``torch.nn.utils.fusion.fuse_conv_bn_weights``) and replaced by ``nn.Identity``. So the
  weights the QAT forward quantizes are exactly the weights that are deployed: there is no
  BN to fold afterwards and nothing to drift. The statistics are frozen from then on, as
  usual when QAT starts from a trained float model.
- GABFusion modules get no quantizer; their outputs feed the quantized consumers.
- Skipped (``skip=`` regex on the path, ``skip_types=``) and unsupported learnable layers
  (ConvTranspose, Conv3d, attention modules, ...) stay float and are listed in the report.

Order: rewrite, then quantize. A quantized model refuses a later rewrite (the LayerNorm
would change the sign of consumer inputs whose quantizers were already chosen).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from fxfusion.passes.find import describe_inputs, leaves, normalize_inputs
from fxfusion.passes.trace import trace_units
from fxfusion.quant import QUANTIZERS, check_bits, make_quantizer
from fxfusion.quant.layers import QUANT_LAYERS, is_quantized, to_quantized
from fxfusion.report import format_table

__all__ = ["QuantizeReport", "quantize", "QuantizerFactory"]

# factory(bits=, role="weight"|"act", signed=, channels=, axis=) -> a QuantizerProtocol module
QuantizerFactory = Callable[..., nn.Module]

_CONVS = (nn.Conv1d, nn.Conv2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)
_UNSUPPORTED = (nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.Embedding)


@dataclass
class QuantizeReport:
    """Per layer: bits and signedness chosen, or why it stayed float; and the BN folds."""

    layers: list[dict]
    bn_folded: list[str]
    float_layers: list[dict]

    def __str__(self) -> str:
        parts = [format_table(self.layers, title=f"Quantized layers ({len(self.layers)})")]
        if self.bn_folded:
            parts.append(f"BatchNorm folded into the preceding conv before QAT: {len(self.bn_folded)}")
        if self.float_layers:
            parts.append(format_table(self.float_layers, title="Left in float"))
        return "\n\n".join(parts)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "bn_folded": self.bn_folded, "float_layers": self.float_layers}


def quantize(
    model: nn.Module,
    example_inputs: Tensor | Sequence,
    *,
    method: str | QuantizerFactory = "lsq",
    w_bits: int = 4,
    a_bits: int = 4,
    first_last_bits: int | None = 8,
    skip: str | None = None,
    skip_types: Iterable[type] = (),
    fold_bn: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Insert fake quantizers for QAT (call after :func:`fxfusion.rewrite`).

    Args:
        model: a float or rewritten model.
        example_inputs: one batch, used to decide signedness and first/last layers.
        method: ``"lsq"``, ``"pact"``, ``"dsq"``, ``"n2uq"``, ``"minmax"``, or your own factory
            ``f(*, bits, role, signed, channels, axis) -> module`` implementing
            :class:`fxfusion.quant.QuantizerProtocol`.
        w_bits, a_bits: bit widths (2..8) of weights and input activations.
        first_last_bits: bits of the first and last layers (None: same as the others).
        skip: regex (``re.search``) on module paths to keep in float, e.g. ``r"model\\.24"``.
        skip_types: layer classes to keep in float.
        fold_bn: fold conv-following BatchNorm before QAT (recommended; see module doc).
        inplace: edit ``model`` itself instead of a deep copy.

    Returns:
        The QAT model; its report is ``model.fxfusion_reports["quantize"]``.

    Example:
        >>> qat = fxfusion.quantize(fxfusion.rewrite(model, x), x, method="lsq", w_bits=4, a_bits=4)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    factory = _factory(method)
    w_bits, a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
    if first_last_bits is not None:
        first_last_bits = check_bits(first_last_bits, "first_last_bits")
    pattern = _compile_skip(skip)
    skip_types = tuple(skip_types)
    already = [n for n, m in model.named_modules() if is_quantized(m)]
    if already:
        raise ValueError(f"{type(model).__name__} is already quantized (e.g. {already[0]!r}); "
                         "quantize the float or rewritten model once")
    inputs = normalize_inputs(example_inputs)
    if not inplace:
        model = copy.deepcopy(model)

    bn_folded = _fold_batchnorms(model) if fold_bn else []
    facts = _observe(model, inputs)
    layers, float_layers, skip_hits = [], [], 0
    for path, layer in list(model.named_modules()):
        if type(layer) not in QUANT_LAYERS:
            if isinstance(layer, _UNSUPPORTED) and not is_quantized(layer):
                float_layers.append({"layer": path, "type": type(layer).__name__,
                                     "reason": "no quantized form for this layer type"})
            continue
        by_pattern = bool(pattern and pattern.search(path))
        if by_pattern or isinstance(layer, skip_types):
            skip_hits += by_pattern  # only regex hits count: a regex that matches nothing must warn
            float_layers.append({"layer": path, "type": type(layer).__name__, "reason": "skipped on request"})
            continue
        role = "first" if path in facts.first else "last" if path in facts.last else ""
        wb, ab = (first_last_bits, first_last_bits) if role and first_last_bits else (w_bits, a_bits)
        unsigned = facts.nonneg.get(path, False)
        wq = factory(bits=wb, role="weight", signed=True, channels=layer.weight.shape[0], axis=0)
        aq = factory(bits=ab, role="act", signed=not unsigned, channels=None, axis=None)
        _set(model, path, to_quantized(layer, wq, aq))
        layers.append({"layer": path, "type": type(layer).__name__, "w_bits": wb, "a_bits": ab,
                       "input": "unsigned" if unsigned else "signed", "role": role or "-",
                       "note": "" if path in facts.seen else "not run by the example forward"})
    if skip and not skip_hits:
        warnings.warn(f"quantize: skip={skip!r} matched no Conv/Linear layer", stacklevel=2)
    model.__dict__.setdefault("fxfusion_reports", {})["quantize"] = QuantizeReport(layers, bn_folded, float_layers)
    return model


def _factory(method: str | QuantizerFactory) -> QuantizerFactory:
    if callable(method):
        return method
    if not isinstance(method, str) or method.lower() not in QUANTIZERS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(QUANTIZERS))}, "
                         "or a factory f(*, bits, role, signed, channels, axis) returning a quantizer module")
    return lambda **kw: make_quantizer(method, **kw)


def _compile_skip(skip: str | None) -> re.Pattern | None:
    if skip is None:
        return None
    try:
        return re.compile(skip)
    except re.error as e:
        raise ValueError(f"skip={skip!r} is not a valid regular expression: {e}") from e


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


# --- BatchNorm folding ----------------------------------------------------------------------

def _fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every BatchNorm whose only input is a conv used by nothing else."""
    folded = []
    for unit in trace_units(model).units:
        modules = dict(unit.graph_module.named_modules())
        for node in unit.graph_module.graph.nodes:
            if not _is_conv_bn(node, modules):
                continue
            conv_node = node.args[0]
            conv_path = _join(unit.path, conv_node.target)
            bn_path = _join(unit.path, node.target)
            conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
            if not bn.track_running_stats or bn.running_mean is None:
                continue
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
            conv.weight, conv.bias = w, b
            _set(model, bn_path, nn.Identity())
            folded.append(bn_path)
    return folded


def _is_conv_bn(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op != "call_module" or type(modules.get(node.target)) not in _BNS:
        return False
    src = node.args[0] if node.args else None
    return (isinstance(src, fx.Node) and src.op == "call_module" and type(modules.get(src.target)) in _CONVS
            and len(src.users) == 1)


# --- one example forward: first/last layers and input signs ---------------------------------

@dataclass
class _Facts:
    first: set[str]
    last: set[str]
    nonneg: dict[str, bool]
    seen: set[str]


def _observe(model: nn.Module, inputs: tuple) -> _Facts:
    run_inputs = tuple(x.detach().clone().requires_grad_(True) if isinstance(x, Tensor) and x.is_floating_point()
                       else x for x in inputs)
    input_ids = {id(x) for x in run_inputs if isinstance(x, Tensor)}
    first, seen, in_fns, out_fns, handles = set(), set(), {}, {}, []
    for path, m in model.named_modules():
        if type(m) not in QUANT_LAYERS:
            continue

        def pre(mod, args, path=path):
            seen.add(path)
            if args and isinstance(args[0], Tensor):
                if id(args[0]) in input_ids:
                    first.add(path)
                in_fns.setdefault(path, args[0].grad_fn)

        def post(mod, args, out, path=path):
            if isinstance(out, Tensor) and out.grad_fn is not None:
                out_fns.setdefault(out.grad_fn, path)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.enable_grad():
            outputs = model(*run_inputs)
    except Exception as e:
        raise ValueError(f"{type(model).__name__} failed on the example inputs ({describe_inputs(inputs)}): {e}. "
                         "Pass inputs of the shape and dtype the model expects.") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    last = _last_layers(outputs, out_fns)
    memo: dict = {}
    nonneg = {p: _nonneg(fn, memo, 0) for p, fn in in_fns.items()}
    return _Facts(first, last, nonneg, seen)


def _last_layers(outputs, out_fns: dict) -> set[str]:
    stack = [t.grad_fn for t in leaves(outputs) if isinstance(t, Tensor) and t.grad_fn is not None]
    last, visited = set(), set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        if fn in out_fns:
            last.add(out_fns[fn])
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return last


_NONNEG_SOURCES = {"ReluBackward0", "ReluBackward1", "SigmoidBackward0", "HardsigmoidBackward0",
                   "SoftmaxBackward0", "AbsBackward0", "ExpBackward0"}
_NONNEG_PRESERVING = {
    "MaxPool2DWithIndicesBackward0", "MaxPool1DWithIndicesBackward0", "AvgPool2DBackward0", "AvgPool1DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveMaxPool2DBackward0", "UpsampleNearest2DBackward0",
    "UpsampleBilinear2DBackward0", "UpsampleNearest1DBackward0", "CatBackward0", "AddBackward0", "MulBackward0",
    "CloneBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "PermuteBackward0",
    "TransposeBackward0", "SliceBackward0", "SelectBackward0", "ExpandBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "UnsqueezeBackward0", "MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1",
    "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "ToCopyBackward0",
}


def _nonneg(fn, memo: dict, depth: int) -> bool:
    """Is the tensor produced by autograd node ``fn`` non-negative by construction?"""
    if fn is None or depth > 64:
        return False
    if fn in memo:
        return memo[fn]
    name = type(fn).__name__
    if name in _NONNEG_SOURCES:
        result = True
    elif name == "HardtanhBackward0":  # ReLU6: hardtanh(0, 6)
        result = float(getattr(fn, "_saved_min_val", -1.0)) >= 0
    elif name in ("ClampMinBackward0", "ClampBackward1"):
        lo = getattr(fn, "_saved_min", None)
        result = lo is not None and float(lo) >= 0
    elif name in _NONNEG_PRESERVING:
        parents = [f for f, _ in fn.next_functions]
        # a python-scalar operand leaves no parent: its sign is unknown, except for mean/view-like ops
        if name in ("AddBackward0", "MulBackward0") and (len(parents) < 2 or any(p is None for p in parents)):
            result = False
        else:
            result = all(_nonneg(p, memo, depth + 1) for p in parents if p is not None) and any(
                p is not None for p in parents)
    else:
        result = False
    memo[fn] = result
    return result


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
