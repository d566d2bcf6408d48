"""Quantized Conv and Linear layers: the float layer plus a weight and an input quantizer.

``QuantConv2d`` *is* an ``nn.Conv2d`` (a subclass), keeps the very same ``weight`` and
``bias`` Parameters under the same names, and adds two child modules::

    y = conv(act_quant(x), weight_quant(weight), bias_q)

The bias is fake-quantized the way integer kernels hold it: int32 with scale ``s_x·s_w``
(per output channel), ``bias_q = rint(b / (s_x·s_w))·s_x·s_w``. onnxruntime's QDQ fusion
(QLinearConv/QGemm) rounds the bias exactly so, so the model we train is the model it runs.

Being a subclass with the same Parameters under the same names keeps checkpoints loading and
``isinstance(m, nn.Conv2d)`` true; the exporter reads everything else it needs from
``weight_quant.qparams()`` and ``act_quant.qparams()``. ``act_quant`` may be None (input left
in float, e.g. a skipped layer's neighbour). ``QuantConv2d.from_float(conv, wq, aq)`` builds the
twin, ``to_float()`` gives the float layer back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxfusion.quant.base import is_quantizer
from fxfusion.quant.ste import round_ste

__all__ = ["QuantConv1d", "QuantConv2d", "QuantLinear", "QUANT_LAYERS", "to_quantized", "is_quantized"]

_QUANT_CHILDREN = ("weight_quant", "act_quant")


class _QuantMixin:
    weight_quant: nn.Module
    act_quant: nn.Module | None
    _fxfusion_quantized = True

    @classmethod
    def from_float(cls, layer: nn.Module, weight_quant: nn.Module, act_quant: nn.Module | None) -> nn.Module:
        """The quantized twin of ``layer``: same Parameters (no copy), attributes and hooks.

        The twin shares ``layer``'s state (its ``__dict__`` entries, so an optimizer holding the
        float Parameters trains the quantized layer) and adds ``weight_quant`` and ``act_quant``
        as children; ``layer`` itself is left without them.

        Args:
            layer: a float layer of exactly the matching type (``nn.Conv2d`` for ``QuantConv2d``).
            weight_quant: the weight quantizer (per output channel, axis 0).
            act_quant: the input quantizer, or None to keep the input in float.

        Raises:
            TypeError: ``layer`` is not of the float type of ``cls``.
        """
        float_cls = _float_class(cls)
        if type(layer) is not float_cls:
            raise TypeError(
                f"{cls.__name__}.from_float expects a {float_cls.__name__}, got {type(layer).__name__}"
            )
        q = cls.__new__(cls)
        q.__dict__.update(layer.__dict__)
        q._modules = dict(layer._modules)  # a new dict: the float layer does not get the children
        q._modules["weight_quant"] = weight_quant
        q._modules["act_quant"] = act_quant
        return q

    def to_float(self) -> nn.Module:
        """The plain float layer, the inverse of :meth:`from_float`.

        It shares this layer's Parameters, attributes and hooks but has no quantizer children;
        its bias is the float bias (the int32 rounding happens only in this layer's forward).
        """
        float_cls = _float_class(type(self))
        layer = float_cls.__new__(float_cls)
        layer.__dict__.update(self.__dict__)
        layer._modules = {k: m for k, m in self._modules.items() if k not in _QUANT_CHILDREN}
        return layer

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
    """The quantized twin of ``layer``, sharing its Parameters (see :meth:`_QuantMixin.from_float`)."""
    return QUANT_LAYERS[type(layer)].from_float(layer, weight_quant, act_quant)


def _float_class(cls: type) -> type:
    """The float layer class a quantized class (or a subclass of one) derives from."""
    return next(c for c in cls.__mro__ if c in QUANT_LAYERS)


def _ready(q: nn.Module) -> bool:
    """A quantizer whose ``qparams()`` describe what its forward does right now."""
    if not (is_quantizer(q) and q.enabled):
        return False
    ready = getattr(q, "ready", None)  # ours: no tensor truth value (a graph break under torch.compile)
    return bool(ready) if ready is not None else bool(getattr(q, "initialized", True))


def is_quantized(m: nn.Module) -> bool:
    """True for the layers that :func:`fxfusion.quantize` placed."""
    return getattr(m, "_fxfusion_quantized", False)
