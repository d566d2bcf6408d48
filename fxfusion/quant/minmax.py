"""Min/max fake quantizer with a straight-through estimator: the QAT baseline.

The classic observer-based fake quantization used by TensorFlow/PyTorch QAT (Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018, arXiv:1712.05877), with the straight-through estimator of Bengio, Léonard and
Courville, "Estimating or Propagating Gradients Through Stochastic Neurons", 2013,
arXiv:1308.3432.

State: running ``min``/``max`` buffers (per tensor, or per channel for weights), updated in every
training forward by an exponential moving average
``r <- (1 - momentum) * r + momentum * batch``; the first batch sets them directly. Activations
use ``momentum = 0.1``; weights use ``momentum = 1`` (the current weights' range, since an average
of past weights lags behind the optimizer). Eval-mode forwards do not update them.

Scale and zero point from the running range (see ``Quantizer._affine``):

- unsigned: ``scale = max / (2^b - 1)``, zero point 0;
- signed weights: ``scale = max(|min|, |max|) / (2^(b-1) - 1)``, zero point 0 (restricted range);
- signed activations (asymmetric): range widened to contain 0,
  ``scale = (max - min) / (2^b - 1)``, ``zero_point = round(qmin - min / scale)``.

Forward: ``y = (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`` (exact ONNX QDQ).
Gradient: ``dy/dx = 1`` where the rounded code is inside ``[qmin, qmax]``, else 0; no learned
parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fxfusion.quant.base import QParams, Quantizer
from fxfusion.quant.ste import fake_quantize

__all__ = ["MinMaxQuantizer"]


class MinMaxQuantizer(Quantizer):
    """Running min/max fake quantizer with STE rounding.

    Args:
        bits, signed, role, per_channel, channels, axis: see :class:`Quantizer`; a signed
            activation gets an integer zero point (asymmetric), per-channel quantizers keep one
            range per channel (weights).
        momentum: EMA momentum in ``(0, 1]``; default 0.1 for activations, 1.0 for weights.

    Buffers: ``running_min``, ``running_max``.

    Example:
        >>> q = MinMaxQuantizer(8, signed=False)
        >>> y = q(torch.rand(4, 16))
        >>> int(q.qparams().zero_point)
        0
    """

    signed_act_scheme = "asymmetric"
    range_names = ("running_min", "running_max")

    def __init__(self, bits: int, *, momentum: float | None = None, **config: Any) -> None:
        super().__init__(bits, **config)
        if momentum is None:
            momentum = 1.0 if self.role == "weight" else 0.1
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"MinMaxQuantizer: momentum={momentum!r} must be in (0, 1], e.g. 0.1")
        self.momentum = float(momentum)

    def _make_params(self) -> None:
        self.register_buffer("running_min", torch.zeros(self.param_shape))
        self.register_buffer("running_max", torch.ones(self.param_shape))

    def _initialize(self, x: Tensor) -> None:
        lo, hi = self._reduce_min_max(x)
        self.running_min.copy_(lo)
        self.running_max.copy_(hi)

    def _quantize(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                lo, hi = self._reduce_min_max(x.detach())
                self.running_min.lerp_(lo.to(self.running_min.dtype), self.momentum)
                self.running_max.lerp_(hi.to(self.running_max.dtype), self.momentum)
        scale, zero_point = self._affine(self.running_min, self.running_max)
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, self.axis)

    def qparams(self) -> QParams:
        """Scale and zero point of the running range."""
        self._require_initialized()
        return self._qparams(*self._affine(self.running_min, self.running_max))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}"
