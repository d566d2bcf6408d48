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

from fxfusion.quant.base import _MIN_SCALE, QParams, Quantizer
from fxfusion.quant.ste import fake_quantize, grad_scale

__all__ = ["N2UQQuantizer"]

_MIN_WIDTH = 1e-6


class _GSTE(torch.autograd.Function):
    """``y = s * code(x)`` forward; the G-STE gradients of the module docstring backward.

    One autograd node for the whole elementwise part. It keeps the input and two small integer
    indices (the code and the interval), and sums the per-element gradients of the interval
    boundaries and widths with one ``index_add_`` each: autograd through ``bounds[j]`` would
    save several full-size tensors and scatter those gradients with an accumulating index put.
    The small per-parameter algebra (cumsum, clamp, gradient scale) stays in autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bounds: Tensor, widths: Tensor, thresholds: Tensor, step: Tensor,
                qmin: int) -> Tensor:
        x_search = x.detach().to(bounds.dtype).contiguous()  # bucketize needs one dtype (e.g. fp16 inputs)
        k = torch.bucketize(x_search, thresholds)  # code - qmin
        j = torch.bucketize(x_search, bounds.detach()) - 1  # interval index: T_j < x <= T_{j+1}
        ctx.save_for_backward(x, k.to(torch.int16), j.to(torch.int16), bounds, widths, step)
        ctx.qmin = qmin
        return step * (qmin + k).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        x, k, j, bounds, widths, step = ctx.saved_tensors
        n = widths.numel()
        j = j.long()
        valid = (j >= 0) & (j < n)
        jc = j.clamp(0, n - 1)
        w, b = widths[jc], bounds[jc]
        gs = torch.where(valid, grad * step / w, torch.zeros_like(w))  # dy/dx = s / a_j inside
        idx = jc.flatten()
        # per-interval sums (a fixed-size index_add, where bincount's size would depend on the data)
        grad_bounds = gs.new_zeros(n + 1).index_add_(0, idx, -gs.flatten())  # dy/dT_j = -s / a_j
        grad_widths = gs.new_zeros(n).index_add_(0, idx, (-gs * (x - b) / w).flatten())
        grad_step = (grad * (ctx.qmin + k).to(grad.dtype)).sum().reshape(step.shape)  # dy/ds = code
        return gs.to(x.dtype), grad_bounds.to(bounds.dtype), grad_widths.to(widths.dtype), None, grad_step, None


class N2UQQuantizer(Quantizer):
    """Nonuniform-to-uniform quantizer: learned input thresholds, uniform output levels.

    Args:
        bits, signed, role, per_channel, channels, axis: see :class:`Quantizer`; signed means
            signed output codes (zero point 0), and ``per_channel`` applies to weights only (one
            L1-norm scale per channel).

    Learned parameters (activations): ``start``, ``widths`` (shape ``(2^b - 1,)``), ``step``.
    Buffer (weights): ``step``, the per-channel scale of the last training forward.

    Example:
        >>> q = N2UQQuantizer(2, signed=False)
        >>> y = q(torch.rand(8, 4))
        >>> q.qparams().thresholds.shape
        torch.Size([3])
    """

    signed_act_scheme = "symmetric"
    range_names = ("start", "widths", "step")

    def _make_params(self) -> None:
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
            value = fake_quantize(x.detach(), self._step(), zero_point, self.qmin, self.qmax, self.axis)
            return value + (x - x.detach())  # exactly the grid value in forward, gradient 1

        # LSQ's gradient scale g = 1/sqrt(N·Qp) on every learned parameter: their gradients sum over
        # the whole tensor, and unscaled a single SGD step can drive the step to zero.
        g = 1.0 / math.sqrt(self._numel_per_scale(x) * max(self.qmax, 1))
        widths = grad_scale(self.widths, g).clamp(min=_MIN_WIDTH)
        bounds = grad_scale(self.start, g) + torch.cat([widths.new_zeros(1), torch.cumsum(widths, 0)])
        thresholds = bounds[:-1] + widths / 2
        return _GSTE.apply(x, bounds, widths, thresholds.detach(), grad_scale(self._step(), g), self.qmin)

    def _step(self) -> Tensor:
        return self._constrain(self.step.clamp(min=_MIN_SCALE))

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
