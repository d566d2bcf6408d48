"""LSQ: Learned Step Size Quantization.

Esser, McKinstry, Bablani, Appuswamy, Modha, "Learned Step Size Quantization", ICLR 2020,
arXiv:1902.08153.

Forward, with the learned step ``s`` (per tensor, or per channel for weights)::

    y = round(clamp(x / s, qmin, qmax)) * s

which equals ONNX QDQ with ``scale = s`` and zero point 0 (the clamp bounds are integers).

Gradients (straight-through rounding)::

    dy/dx = 1                                  if qmin <= x/s <= qmax, else 0
    dy/ds = (round(x/s) - x/s) * g             if qmin <= x/s <= qmax
          = qmin * g  or  qmax * g             below or above the range

with the gradient scale ``g = 1 / sqrt(N * Qp)``, ``Qp = qmax`` and ``N`` the number of elements
that share the step (per-channel weights: the elements of one channel).

Ranges: unsigned activations use ``(0, 2^b-1)``; signed activations the full signed range
``(-2^(b-1), 2^(b-1)-1)`` (symmetric, zero point 0, as in the paper); signed weights the
restricted symmetric range ``(-(2^(b-1)-1), 2^(b-1)-1)``.

Initialization (as in the paper), on the first batch: ``s = 2 * mean(|x|) / sqrt(Qp)``, per
channel for per-channel weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fxfusion.quant.base import _MIN_SCALE, QParams, Quantizer
from fxfusion.quant.ste import _expand, clip, grad_scale, round_ste

__all__ = ["LSQQuantizer"]


class LSQQuantizer(Quantizer):
    """Learned step size fake quantizer (LSQ).

    Args:
        bits, signed, role, per_channel, channels, axis: see :class:`Quantizer`; signed
            activations use the full signed range with zero point 0 (symmetric, as in the paper),
            per-channel quantizers learn one step per channel (weights).

    Learned parameter: ``step``, shape ``()`` or ``(channels,)``.

    Example:
        >>> q = LSQQuantizer(4, signed=True, per_channel=True, channels=8)
        >>> w_q = q(torch.randn(8, 3, 3, 3))
        >>> q.qparams().scale.shape
        torch.Size([8])
    """

    signed_act_scheme = "symmetric"
    range_names = ("step",)

    def _make_params(self) -> None:
        self.step = nn.Parameter(torch.ones(self.param_shape))

    def _initialize(self, x: Tensor) -> None:
        # Paper: s0 = 2 <|v|> / sqrt(Qp).
        step = 2.0 * self._reduce_abs_mean(x) / math.sqrt(self.qmax)
        self.step.copy_(step.clamp(min=_MIN_SCALE))

    def _quantize(self, x: Tensor) -> Tensor:
        g = 1.0 / math.sqrt(self._numel_per_scale(x) * self.qmax)
        s = _expand(grad_scale(self._step(), g), x, self.axis)
        return round_ste(clip(x / s, self.qmin, self.qmax)) * s

    def _step(self) -> Tensor:
        # A step driven to <= 0 by the optimizer would flip the grid; keep it positive.
        return self._constrain(self.step.clamp(min=_MIN_SCALE))

    def qparams(self) -> QParams:
        """Scale = the learned step, zero point 0."""
        self._require_initialized()
        step = self._step()
        return self._qparams(step, torch.zeros_like(step, dtype=torch.int64))
