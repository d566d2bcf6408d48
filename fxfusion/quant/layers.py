"""Quantized Conv and Linear layers: the float layer plus a weight and an input quantizer.

``QuantConv2d`` *is* an ``nn.Conv2d`` (a subclass), keeps the very same ``weight`` and
``bias`` Parameters under the same names, and adds two child modules::

    y = conv(act_quant(x), weight_quant(weight), bias_q)

The bias is fake-quantized the way integer kernels hold it: int32 with scale ``s_x·s_w``
(per output channel), ``bias_q = rint(b / (s_x·s_w))·s_x·s_w``. onnxruntime's QDQ fusion
(QLinearConv/QGemm) rounds the bias exactly so, so the model we train is the model it runs.

so checkpoints keep loading, ``isinstance(m, nn.Conv2d)`` still holds, and the exporter
reads everything it needs from ``weight_quant.qparams()`` and ``act_quant.qparams()``.
``act_quant`` may be None (input left in float, e.g. a skipped layer's neighbour).
"""

from __future__ import annotations

import torch.nn.functional as F
import torch
from torch import Tensor, nn

from fxfusion.quant.base import round_ste

__all__ = ["QuantConv1d", "QuantConv2d", "QuantLinear", "QUANT_LAYERS", "to_quantized", "is_quantized"]


class _QuantMixin:
    weight_quant: nn.Module
    act_quant: nn.Module | None
    _fxfusion_quantized = True

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    def _quant_bias(self) -> Tensor | None:
        """The bias on the int32 grid of step ``s_x·s_w`` (after both quantizers ran)."""
        b, aq, wq = self.bias, self.act_quant, self.weight_quant
        if b is None or aq is None or not (_ready(aq) and _ready(wq)):
            return b
        step = (aq.qparams().scale * wq.qparams().scale).detach().to(b.dtype)
        return round_ste(torch.clamp(b / step, -(2 ** 31), 2 ** 31 - 1)) * step


class QuantConv1d(_QuantMixin, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input."""

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._quant_input(x), self.weight_quant(self.weight)
        return self._conv_forward(x, w, self._quant_bias())


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._quant_input(x), self.weight_quant(self.weight)
        return self._conv_forward(x, w, self._quant_bias())


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    def forward(self, x: Tensor) -> Tensor:
        x, w = self._quant_input(x), self.weight_quant(self.weight)
        return F.linear(x, w, self._quant_bias())


# float class -> quantized class (exact types: subclasses such as ConvTranspose are not covered)
QUANT_LAYERS: dict[type, type] = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def to_quantized(layer: nn.Module, weight_quant: nn.Module, act_quant: nn.Module | None) -> nn.Module:
    """The quantized twin of ``layer``, sharing its Parameters (no copy) and attributes."""
    cls = QUANT_LAYERS[type(layer)]
    q = cls.__new__(cls)
    q.__dict__.update(layer.__dict__)
    q._modules = dict(layer._modules)
    q._modules["weight_quant"] = weight_quant
    q._modules["act_quant"] = act_quant
    return q


def _ready(q: nn.Module) -> bool:
    return getattr(q, "enabled", True) and bool(getattr(q, "initialized", True)) and hasattr(q, "qparams")


def is_quantized(m: nn.Module) -> bool:
    """True for the layers that :func:`fxfusion.quantize` placed."""
    return getattr(m, "_fxfusion_quantized", False)
