"""DSQ: Differentiable Soft Quantization.

Gong, Liu, Jiang, Li, Hu, Lin, Yu, Yan, "Differentiable Soft Quantization: Bridging
Full-Precision and Low-Bit Neural Networks", ICCV 2019, arXiv:1908.05033.

The grid: clip range ``[l, u]`` cut into ``n = 2^b - 1`` intervals of width
``delta = (u - l) / n``; interval ``P_i = [l + i*delta, l + (i+1)*delta)`` has midpoint
``m_i = l + (i + 0.5) * delta``. Training forward, the paper's soft quantizer::

    Q_S(x) = l                                   if x < l
           = u                                   if x > u
           = l + delta * (i + (phi(x) + 1) / 2)  if x in P_i
    phi(x) = s * tanh(k * (x - m_i)),  k = log(2/alpha - 1) / delta,  s = 1 / (1 - alpha)

so that ``phi = -1, +1`` at the interval ends (Q_S is continuous) and ``alpha`` (the
characteristic variable, ``1 - tanh(0.5 k delta)``) sets how far Q_S is from the hard step.
Gradients are the exact derivatives of Q_S, e.g. inside ``P_i``
``dQ_S/dx = delta/2 * s * k * (1 - tanh^2(k (x - m_i)))``; ``l``, ``u`` and ``alpha`` are learned by
autograd through Q_S. ``alpha`` is clamped to ``[1e-4, 0.5]``: its definition allows ``(0, 1)``,
but large values make Q_S close to a straight line (no longer a quantizer) and values near 0 make
the gradient a spike.

Eval forward (and ``qparams()``): the hard quantizer on the same grid, ``sgn(phi)`` in place of
``phi``, i.e. ONNX QDQ with ``scale = delta``. With ``soft_forward=False`` the training forward is
hard too and only the backward uses Q_S (hard forward, soft backward).

Integer grid: unsigned activations use ``l = 0`` (zero point 0) and learn ``u``; signed weights
use ``[-u, u]`` on the restricted symmetric range and learn ``u`` per channel; signed activations
learn ``l <= 0 <= u`` with an integer zero point, ``zp = round(qmin - l / delta)``, and the grid's
lower end is ``(qmin - zp) * delta`` (``l`` rounded to a multiple of ``delta`` so 0 is a code).

Initialization on the first batch: ``u = max(x)``, ``l = min(min(x), 0)`` (per channel for weights;
``u = max|w|`` for symmetric weights); ``alpha = 0.2`` (the paper's starting value).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fxfusion.quant.base import _MIN_SCALE, QParams, Quantizer
from fxfusion.quant.ste import _expand, clip, fake_quantize, round_ste

__all__ = ["DSQQuantizer"]

ALPHA_MIN = 1e-4
ALPHA_MAX = 0.5


class DSQQuantizer(Quantizer):
    """Differentiable soft quantizer (DSQ): tanh-smoothed steps in training, hard steps in eval.

    Args:
        bits, signed, role, per_channel, channels, axis: see :class:`Quantizer`; a signed
            activation learns both clip bounds (asymmetric grid), per-channel quantizers keep one
            clip range per channel (weights).
        alpha: initial characteristic variable (0.2 in the paper).
        soft_forward: training forward returns Q_S (True, the paper) or the hard grid value with
            Q_S's gradient (False).

    Learned parameters: ``upper`` (u), ``lower`` (l, signed activations only), ``alpha`` (scalar).

    Example:
        >>> q = DSQQuantizer(3, signed=False)
        >>> y_soft = q(torch.rand(16))
        >>> y_hard = q.eval()(torch.rand(16))
    """

    signed_act_scheme = "asymmetric"
    range_names = ("upper", "lower")  # not alpha: it shapes the steps, not the range

    def __init__(self, bits: int, *, alpha: float = 0.2, soft_forward: bool = True, **config: Any) -> None:
        super().__init__(bits, **config)
        if not ALPHA_MIN <= alpha <= ALPHA_MAX:
            raise ValueError(
                f"DSQQuantizer: alpha={alpha!r} is outside [{ALPHA_MIN}, {ALPHA_MAX}]; "
                f"the paper starts from alpha=0.2"
            )
        self.soft_forward = bool(soft_forward)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def _make_params(self) -> None:
        self.upper = nn.Parameter(torch.ones(self.param_shape))
        if self.scheme == "asymmetric":
            self.lower = nn.Parameter(torch.full(self.param_shape, -1.0))

    def _initialize(self, x: Tensor) -> None:
        lo, hi = self._reduce_min_max(x)
        if self.scheme == "symmetric":
            hi = torch.maximum(lo.abs(), hi.abs())
        self.upper.copy_(hi.clamp(min=_MIN_SCALE))
        if self.scheme == "asymmetric":
            self.lower.copy_(lo.clamp(max=0))

    def _grid(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(delta, zero_point, l)`` of the current grid; ``delta`` and ``l`` keep autograd."""
        if self.scheme == "asymmetric":
            delta, zero_point = self._affine(self.lower, self.upper)
            # l rounded to the grid (its code is the zero point); round_ste lets the gradient
            # reach `lower` unchanged.
            lower = self.lower.clamp(max=0)
            code = clip(round_ste(self.qmin - lower / delta), self.qmin, self.qmax)
            return delta, zero_point, (self.qmin - code) * delta
        upper = self.upper.clamp(min=_MIN_SCALE)
        delta, zero_point = self._affine(-upper, upper)
        return delta, zero_point, self.qmin * delta

    def _quantize(self, x: Tensor) -> Tensor:
        delta, zero_point, lower = self._grid()
        if not self.training:
            return fake_quantize(x, delta, zero_point, self.qmin, self.qmax, self.axis)
        soft = self._soft(x, _expand(delta, x, self.axis), _expand(lower, x, self.axis))
        if self.soft_forward:
            return soft
        hard = fake_quantize(x.detach(), delta.detach(), zero_point, self.qmin, self.qmax, self.axis)
        return soft + (hard - soft).detach()

    def _soft(self, x: Tensor, delta: Tensor, lower: Tensor) -> Tensor:
        """Q_S(x), computed in grid units ``t = (x - l) / delta`` in ``[0, n]``."""
        n = self.qmax - self.qmin
        alpha = self.alpha.clamp(ALPHA_MIN, ALPHA_MAX)
        k_delta = torch.log(2.0 / alpha - 1.0)  # k * delta
        s = 1.0 / (1.0 - alpha)
        t = clip((x - lower) / delta, 0, n)
        i = torch.floor(t.detach()).clamp(0, n - 1)  # interval index, piecewise constant
        phi = s * torch.tanh(k_delta * (t - i - 0.5))
        return lower + delta * (i + (phi + 1.0) / 2.0)

    def qparams(self) -> QParams:
        """The hard grid: ``scale = delta``, zero point as above."""
        self._require_initialized()
        delta, zero_point, _ = self._grid()
        return self._qparams(delta, zero_point)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, soft_forward={self.soft_forward}"
