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
  ``torch.nn.utils.fusion.fuse_conv_bn_weights``) and removed (``nn.Identity``, or the YOLO
  blocks' own fused form: no ``bn``, ``forward = forward_fuse``). So the
  weights the QAT forward quantizes are exactly the weights that are deployed: there is no
  BN to fold afterwards and nothing to drift. The statistics are frozen from then on, as
  usual when QAT starts from a trained float model.
- GABFusion modules get no quantizer; their outputs feed the quantized consumers.
- Layers with a frozen weight (``requires_grad=False``, e.g. Ultralytics' DFL) stay float: QAT
  would never train their step, and their fixed weights need not lie on a low-bit grid.
- Skipped (``skip=`` regex on the path, ``skip_types=``) and unsupported learnable layers
  (ConvTranspose, Conv3d, attention modules, ...) stay float and are listed in the report, as do
  layers whose forward the example forward never calls (a quantizer there would never run, e.g.
  when the weight is read by a functional call such as Swin's ``F.linear(x, qkv.weight)``).

Quantizers initialize lazily, on their first input (a real training batch, not the example
input). Under ``torch.compile``, take that first step eagerly, then compile: the rewritten,
quantized model with ADA, AlphaBalancer and NormSchedule then compiles to one graph with no graph
break, and the moving gate does not recompile it (``tests/test_compile.py``). Initializing inside
the compiled step breaks the graph at every quantizer.

Order: rewrite, then quantize. A quantized model refuses a later rewrite (the LayerNorm
would change the sign of consumer inputs whose quantizers were already chosen).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from fxfusion.passes.dataflow import nonneg
from fxfusion.passes.runtime import (
    compile_regex,
    join,
    leaves,
    network,
    normalize_inputs,
    paused_gc,
    removing,
    run_example,
    set_submodule,
    tracked,
)
from fxfusion.passes.trace import TracedUnit, trace_units
from fxfusion.quant import QUANTIZERS, check_bits, make_quantizer
from fxfusion.quant.layers import QUANT_LAYERS, is_quantized, to_quantized
from fxfusion.report import format_table

__all__ = ["QuantizeReport", "QuantizerFactory", "conv_bn_pairs", "fold_batchnorms", "quantize"]

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


@paused_gc()
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
    pow2: bool = False,
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
        pow2: power-of-two scales for every quantizer (built-in methods only; see
            :class:`fxfusion.quant.Quantizer`). The exported ONNX then reproduces the deployed
            model bit for bit in onnxruntime wherever the float ops between quantizers are exact
            in float32 (convs, linears, adds, concats, ReLU, max pooling); with free float scales
            the two runtimes may round a value that sits on a rounding tie differently.
        inplace: edit ``model`` itself instead of a deep copy.

    Returns:
        The QAT model; its report is ``model.fxfusion_reports["quantize"]``.

    Example:
        >>> from fxfusion.zoo import build
        >>> qat = fxfusion.quantize(fxfusion.rewrite(build("resnet"), x), x, method="lsq", w_bits=4, a_bits=4)
        >>> layer = qat.fxfusion_reports["quantize"].layers[1]
        >>> layer["w_bits"], layer["a_bits"]
        (4, 4)
    """
    model = network(model, "quantize", edits=True)
    factory = _factory(method, pow2)
    w_bits, a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
    if first_last_bits is not None:
        first_last_bits = check_bits(first_last_bits, "first_last_bits")
    pattern = compile_regex(skip, "skip")
    skip_types = tuple(skip_types)
    already = [n for n, m in model.named_modules() if is_quantized(m)]
    if already:
        raise ValueError(f"{type(model).__name__} is already quantized (e.g. {already[0]!r}); "
                         "quantize the float or rewritten model once")
    inputs = normalize_inputs(example_inputs)
    if not inplace:
        model = copy.deepcopy(model)

    bn_folded = fold_batchnorms(model) if fold_bn else []
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
        if not layer.weight.requires_grad:  # e.g. Ultralytics' DFL conv: fixed 0..15 weights, never trained
            float_layers.append({"layer": path, "type": type(layer).__name__,
                                 "reason": "its weight is frozen (requires_grad=False): QAT cannot adapt it to a grid"})
            continue
        if path not in facts.seen:  # e.g. Swin's attention reads qkv.weight in F.linear: a quantizer never runs
            float_layers.append({"layer": path, "type": type(layer).__name__,
                                 "reason": "its forward is not called by the example forward (unused, or its weight "
                                           "is read by a functional call that a quantizer would not see)"})
            continue
        role = "first" if path in facts.first else "last" if path in facts.last else ""
        wb, ab = (first_last_bits, first_last_bits) if role and first_last_bits else (w_bits, a_bits)
        unsigned = facts.nonneg.get(path, False)
        wq = factory(bits=wb, role="weight", signed=True, channels=layer.weight.shape[0], axis=0)
        aq = factory(bits=ab, role="act", signed=not unsigned, channels=None, axis=None)
        set_submodule(model, path, to_quantized(layer, wq, aq))
        layers.append({"layer": path, "type": type(layer).__name__, "w_bits": wb, "a_bits": ab,
                       "input": "unsigned" if unsigned else "signed", "role": role or "-"})
    if skip and not skip_hits:
        warnings.warn(f"quantize: skip={skip!r} matched no Conv/Linear layer", stacklevel=2)
    model.__dict__.setdefault("fxfusion_reports", {})["quantize"] = QuantizeReport(layers, bn_folded, float_layers)
    return model


def _factory(method: str | QuantizerFactory, pow2: bool) -> QuantizerFactory:
    if not isinstance(pow2, bool):
        raise TypeError(f"quantize: pow2 must be a bool, got {pow2!r}")
    if callable(method):
        if pow2:
            raise ValueError("quantize: pow2=True applies to the built-in methods; a custom factory "
                             "chooses its own scales (build its quantizers with power-of-two scales instead)")
        return method
    if not isinstance(method, str) or method.lower() not in QUANTIZERS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(QUANTIZERS))}, "
                         "or a factory f(*, bits, role, signed, channels, axis) returning a quantizer module")
    return lambda **kw: make_quantizer(method, pow2=pow2, **kw)


# --- BatchNorm folding ----------------------------------------------------------------------

def conv_bn_pairs(units: Iterable[TracedUnit]) -> list[tuple[str, str]]:
    """``(conv path, BatchNorm path)`` for every BatchNorm whose only input is a conv used by nothing
    else, in traced ``units`` (:func:`~fxfusion.passes.trace.trace_units`)."""
    pairs = []
    for unit in units:
        modules = dict(unit.graph_module.named_modules())
        for node in unit.graph_module.graph.nodes:
            if _is_conv_bn(node, modules):
                pairs.append((join(unit.path, node.args[0].target), join(unit.path, node.target)))
    return pairs


def fold_batchnorms(model: nn.Module, pairs: Iterable[tuple[str, str]] | None = None) -> list[str]:
    """Fold every BatchNorm whose only input is a conv used by nothing else; the folded paths.

    ``pairs`` (from :func:`conv_bn_pairs` on a trace of this model's structure, e.g. the one
    :func:`~fxfusion.passes.find.find_fusions` made) saves tracing the model again.
    """
    if pairs is None:
        if not any(isinstance(m, _BNS) for m in model.modules()):
            return []
        pairs = conv_bn_pairs(trace_units(model).units)
    folded = []
    for conv_path, bn_path in pairs:
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
        conv.weight, conv.bias = w, b
        _drop_folded_bn(model, bn_path)
        folded.append(bn_path)
    return folded


def _drop_folded_bn(model: nn.Module, bn_path: str) -> None:
    """Remove a BatchNorm that was folded into its conv, the way the owner's framework would.

    The YOLO convention (YOLOv5, Ultralytics): a block with a ``bn`` child and a ``forward_fuse``
    method is fused by deleting ``bn`` and setting ``forward = forward_fuse``; their ``fuse()``
    skips a block in that state and refuses one whose ``bn`` is anything else. Such a block gets
    exactly that state, so ``model.fuse()`` (called by Ultralytics' predict, val and export) leaves
    the quantized conv alone. Any other BatchNorm becomes ``nn.Identity``.
    """
    parent_path, _, name = bn_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if name == "bn" and callable(getattr(type(parent), "forward_fuse", None)):
        delattr(parent, "bn")
        parent.forward = parent.forward_fuse
    else:
        set_submodule(model, bn_path, nn.Identity())


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
    run_inputs = tracked(inputs)
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
    with removing(handles):
        outputs = run_example(model, run_inputs, grad=True)
    last = _last_layers(outputs, out_fns)
    memo: dict = {}
    nonneg_inputs = {p: nonneg(fn, memo) for p, fn in in_fns.items()}
    return _Facts(first, last, nonneg_inputs, seen)


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
