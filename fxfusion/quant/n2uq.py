"""N2UQ: Nonuniform-to-Uniform Quantization.

Liu, Cheng, Huang, Xing, Shen, "Nonuniform-to-Uniform Quantization: Towards Accurate
Quantization via Generalized Straight-Through Estimation", CVPR 2022, arXiv:2111.14826.

Activations: learned, non-uniformly spaced *input* thresholds and uniform *output* levels, so the
deployed tensor is an ordinary integer code times a scale.

Parametrization (as in the authors' release): a learned ``start`` and ``n = 2^b - 1`` positive
interval widths ``a_0..a_{n-1}`` (clamped to ``>= 1e-6``, so the thresholds stay ordered) give
the interval boundaries ``T_0 = start``, ``T_{j+1} = T_j + a_j``. The forward thresholds are the
interval midpoints ``t_j = T_j + a_j / 2``, and with the learned output step ``s``::

    code(x) = qmin + #{j : x > t_j}            (in [qmin, qmax])
    y       = s * code(x)                      (= DequantizeLinear(code, s, 0))

Generalized straight-through estimator (G-STE): the backward pass differentiates
the piecewise-linear function that the stochastic version of this quantizer has as expectation::

    F(x) = s * (qmin + 0)                            x <= T_0
         = s * (qmin + j + (x - T_j) / a_j)          T_j < x <= T_{j+1}
         = s * (qmin + n)                            x > T_n

so, inside interval ``j``: ``dy/dx = s / a_j``; ``dy/dstart = -s / a_j``;
``dy/da_i = -s / a_j`` for ``i < j``, ``-s (x - T_j) / a_j^2`` for ``i = j``, 0 for ``i > j``;
outside ``[T_0, T_n]`` these are 0. ``dy/ds = code(x)`` (the forward level). The gradients of
``start``, ``a`` and ``s`` are then multiplied by LSQ's ``g = 1 / sqrt(N * qmax)`` (N: elements
per tensor): they sum over all N elements, and unscaled one SGD step can collapse ``s``.

Output levels: unsigned activations use codes ``0..2^b-1`` (levels ``0..(2^b-1) s``); signed
activations use ``-2^(b-1)..2^(b-1)-1``. Zero point is 0 in both cases.

Initialization on the first batch: a uniform staircase, ``s = max(x) / qmax`` (signed:
``max(max(x) / qmax, min(x) / qmin)``), ``a_j = s``, ``start = qmin * s``; then ``t_j`` are the
midpoints ``(qmin + j + 1/2) s``, ``y`` is round-to-nearest on the grid and ``dy/dx = 1`` inside it.

Weights (the paper's "entropy preserving" weight quantization): a per-channel scale tied to the
L1 norm of the weights, ``clip = gamma * mean|w|`` with ``gamma = (2^b - 1) / 2^(b-1)``; the
weights are clipped to ``[-clip, clip]`` and quantized uniformly. The paper's grid has ``2^b``
levels symmetric around 0 without a zero level, a half-integer zero point that ONNX
QuantizeLinear cannot express; here the same clip range carries the restricted symmetric grid
(``2^b - 1`` levels, zero point 0): ``scale = clip / (2^(b-1) - 1)``. The scale is recomputed
from the current weights on every training forward (frozen in eval, and detached, as in the
authors' code), and ``dy/dw = 1`` for every weight (their straight-through estimator).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fxfusion.quant.base import _MIN_SCALE, QParams, Quantizer, fake_quantize, grad_scale

__all__ = ["N2UQQuantizer"]

_MIN_WIDTH = 1e-6


class N2UQQuantizer(Quantizer):
    """Nonuniform-to-uniform quantizer: learned input thresholds, uniform output levels.

    Args:
        bits: bit width, 2..8.
        signed: signed output codes.
        role: ``"weight"`` or ``"act"``; default ``"weight"`` when ``per_channel`` else ``"act"``.
        per_channel: weights only; one L1-norm scale per channel along ``axis``.
        channels: number of channels when ``per_channel``.
        axis: channel axis when ``per_channel`` (default 0).

    Learned parameters (activations): ``start``, ``widths`` (shape ``(2^b - 1,)``), ``step``.
    Buffer (weights): ``step``, the per-channel scale of the last training forward.

    Example:
        >>> q = N2UQQuantizer(2, signed=False)
        >>> y = q(torch.rand(8, 4))
        >>> q.qparams().thresholds.shape
        torch.Size([3])
    """

    def __init__(
        self,
        bits: int,
        *,
        signed: bool,
        role: str | None = None,
        per_channel: bool = False,
        channels: int | None = None,
        axis: int | None = None,
    ) -> None:
        super().__init__(
            bits,
            signed=signed,
            role=role,
            per_channel=per_channel,
            channels=channels,
            axis=axis,
            signed_act_scheme="symmetric",
        )
        if self.role == "weight":
            self.register_buffer("step", torch.ones(self.param_shape))
            return
        if self.per_channel:
            raise ValueError(
                "N2UQQuantizer: activations are quantized per tensor (one set of thresholds); "
                "pass per_channel=False for role='act'"
            )
        n = self.qmax - self.qmin
        self.start = nn.Parameter(torch.tensor(float(self.qmin)))
        self.widths = nn.Parameter(torch.ones(n))
        self.step = nn.Parameter(torch.tensor(1.0))

    def _initialize(self, x: Tensor) -> None:
        if self.role == "weight":
            self.step.copy_(self._weight_step(x))
            return
        lo, hi = self._reduce_min_max(x)
        step = hi.clamp(min=0) / self.qmax
        if self.scheme == "symmetric":
            step = torch.maximum(step, lo.clamp(max=0) / self.qmin)
        step = step.clamp(min=_MIN_SCALE)
        self.step.copy_(step)
        self.widths.copy_(step.expand_as(self.widths))
        self.start.copy_(self.qmin * step)

    def _weight_step(self, w: Tensor) -> Tensor:
        gamma = (2**self.bits - 1) / 2 ** (self.bits - 1)
        clip = gamma * self._reduce_abs_mean(w)
        return (clip / self.qmax).clamp(min=_MIN_SCALE)

    def _quantize(self, x: Tensor) -> Tensor:
        if self.role == "weight":
            if self.training:
                with torch.no_grad():
                    self.step.copy_(self._weight_step(x.detach()))
            zero_point = torch.zeros_like(self.step, dtype=torch.int64)
            value = fake_quantize(x.detach(), self.step, zero_point, self.qmin, self.qmax, self.axis)
            return value + (x - x.detach())  # exactly the grid value in forward, gradient 1

        # LSQ's gradient scale g = 1/sqrt(N·Qp) on every learned parameter: their gradients sum over
        # the whole tensor, and unscaled a single SGD step can drive the step to zero.
        g = 1.0 / math.sqrt(self._numel_per_scale(x) * max(self.qmax, 1))
        widths = grad_scale(self.widths, g).clamp(min=_MIN_WIDTH)
        bounds = grad_scale(self.start, g) + torch.cat([widths.new_zeros(1), torch.cumsum(widths, 0)])
        thresholds = bounds[:-1] + widths / 2
        n = widths.numel()

        x_search = x.detach().to(bounds.dtype).contiguous()  # bucketize needs one dtype (e.g. fp16 inputs)
        code = self.qmin + torch.bucketize(x_search, thresholds.detach()).to(x.dtype)
        # G-STE: the piecewise-linear F(x), evaluated by interval index j (T_j < x <= T_{j+1}).
        j = torch.bucketize(x_search, bounds.detach()) - 1
        jc = j.clamp(0, n - 1)
        inside = jc + (x - bounds[jc]) / widths[jc]
        ramp = torch.where(j < 0, torch.zeros_like(inside), torch.where(j >= n, torch.full_like(inside, n), inside))
        return grad_scale(self._step(), g) * (code + (ramp - ramp.detach()))

    def _step(self) -> Tensor:
        return self.step.clamp(min=_MIN_SCALE)

    def thresholds(self) -> Tensor:
        """The sorted forward input thresholds ``t_j`` (activations only), detached."""
        if self.role == "weight":
            raise ValueError("N2UQQuantizer.thresholds(): weight quantizers are uniform and have none")
        with torch.no_grad():
            widths = self.widths.clamp(min=_MIN_WIDTH)
            bounds = self.start + torch.cat([widths.new_zeros(1), torch.cumsum(widths, 0)])
            return bounds[:-1] + widths / 2  # the very expression forward compares against

    def qparams(self) -> QParams:
        """``scale`` = output level step, zero point 0; activations add ``thresholds`` and ``levels``."""
        self._require_initialized()
        step = self._step()
        zero_point = torch.zeros_like(step, dtype=torch.int64)
        if self.role == "weight":
            return self._qparams(step, zero_point)
        with torch.no_grad():
            levels = torch.arange(self.qmin, self.qmax + 1, dtype=step.dtype, device=step.device) * step
        return self._qparams(step, zero_point, thresholds=self.thresholds().clone(), levels=levels)
