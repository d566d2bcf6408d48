"""Quantized Conv and Linear layers: the float layer plus a weight and an input quantizer.

``QuantConv2d`` *is* an ``nn.Conv2d`` (a subclass), keeps the very same ``weight`` and
``bias`` Parameters under the same names, and adds two child modules::

    y = conv(act_quant(x), weight_quant(weight), bias)

so checkpoints keep loading, ``isinstance(m, nn.Conv2d)`` still holds, and the exporter
reads everything it needs from ``weight_quant.qparams()`` and ``act_quant.qparams()``.
``act_quant`` may be None (input left in float, e.g. a skipped layer's neighbour).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QuantConv1d", "QuantConv2d", "QuantLinear", "QUANT_LAYERS", "to_quantized", "is_quantized"]


class _QuantMixin:
    weight_quant: nn.Module
    act_quant: nn.Module | None
    _fxfusion_quantized = True

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)


class QuantConv1d(_QuantMixin, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.weight_quant(self.weight), self.bias)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.weight_quant(self.weight), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x), self.weight_quant(self.weight), self.bias)


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


def is_quantized(m: nn.Module) -> bool:
    """True for the layers that :func:`fxfusion.quantize` placed."""
    return getattr(m, "_fxfusion_quantized", False)
