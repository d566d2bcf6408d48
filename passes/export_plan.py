"""What an ONNX export will quantize: each quantized layer and standalone quantizer, with its grid.

The plan is read from the model before anything is traced, so a quantizer that cannot be
exported (uninitialized, an unsupported weight grid) is refused before any work, and the later
steps (``export_trace``, ``onnx_qdq``) act on typed records instead of the modules.
:func:`quantized_activations` lists the same activation quantizers for
:func:`fxfusion.passes.verify.verify_onnx`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxfusion.quant.base import QParams, is_quantizer
from fxfusion.quant.layers import is_quantized

__all__ = ["quantized_activations"]


@dataclass
class _Plan:
    name: str
    kind: str
    weight: QParams | None
    act: QParams | None
    quantizer: nn.Module | None = None  # the act quantizer (for ranks and standalone nodes)
    skipped: str = ""

    @property
    def needs_int4(self) -> bool:
        return any(q is not None and q.bits <= 4 for q in (self.weight, self.act))


def _all_quantizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_quantizer(m)]


def quantized_activations(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, quantizer)`` of every enabled activation quantizer, in module order.

    ``path`` is the quantized layer's path for its ``act_quant``, or the quantizer's own path for
    one that sits outside a quantized layer; :func:`~fxfusion.passes.onnx_qdq.activation_prefix` of it
    names its ONNX nodes.
    """
    layers = [(name, m.act_quant) for name, m in model.named_modules() if is_quantized(m) and m.act_quant is not None]
    found = layers + _standalone_quantizers(model)
    return [(name, q) for name, q in found if q.enabled]


def _standalone_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Quantizers that are not a quantized layer's ``weight_quant``/``act_quant`` (nor inside one)."""
    owned: set[int] = set()
    for m in model.modules():
        if is_quantized(m):
            owned.update(id(sub) for q in (m.weight_quant, m.act_quant) if q is not None for sub in q.modules())
    found = []
    for name, q in model.named_modules():
        if is_quantizer(q) and id(q) not in owned:
            owned.update(id(sub) for sub in q.modules())  # an adapter's inner quantizer is not another one
            found.append((name, q))
    return found


def _plan(model: nn.Module) -> tuple[list[_Plan], list[_Plan]]:
    """Quantized layers and standalone activation quantizers, with their grids."""
    plans: list[_Plan] = []
    for name, m in model.named_modules():
        if not is_quantized(m):
            continue
        wq, aq = m.weight_quant, m.act_quant
        plan = _Plan(
            name,
            type(m).__name__.replace("Quant", ""),
            _qparams(wq, f"{name}.weight_quant"),
            _qparams(aq, f"{name}.act_quant"),
            aq,
        )
        off = [f"{name}.{k}" for k, q in (("weight_quant", wq), ("act_quant", aq)) if q is not None and not q.enabled]
        if off:
            plan.skipped = f"{', '.join(off)} disabled (enabled=False): left in float, as in the PyTorch model"
        if plan.weight is not None and (plan.weight.axis not in (None, 0) or plan.weight.thresholds is not None):
            raise ValueError(
                f"{name}.weight_quant: only uniform per-tensor or per-output-channel (axis=0) weight grids "
                f"can be exported, got axis={plan.weight.axis}"
                f"{' with thresholds' if plan.weight.thresholds is not None else ''}"
            )
        plans.append(plan)
    standalone = [
        _Plan(name, type(q).__name__, None, _qparams(q, name), q)
        for name, q in _standalone_quantizers(model)
        if q.enabled
    ]
    if any(p.name == "" for p in standalone):
        raise ValueError("the model itself is a quantizer; export the network that contains it")
    return plans, standalone


def _qparams(q: nn.Module | None, where: str) -> QParams | None:
    if q is None or not q.enabled:
        return None
    try:
        qp = q.qparams()
    except RuntimeError as e:
        raise ValueError(f"{where}: cannot read its quantization parameters: {e}") from e
    if not isinstance(qp, QParams):
        raise TypeError(f"{where}.qparams() returned {type(qp).__name__}; it must return fxfusion.quant.QParams")
    if not bool(torch.isfinite(qp.scale).all()) or bool((qp.scale <= 0).any()):
        raise ValueError(f"{where}: its scale is {qp.scale.flatten()[:4].tolist()}, not finite and positive: the "
                         "quantizer's range diverged (NaN or inf reached it in training); retrain with a lower "
                         "learning rate or gradient clipping, or re-initialize it before export")
    return qp
