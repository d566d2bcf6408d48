"""PACT: Parameterized Clipping Activation.

Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan, "PACT: Parameterized Clipping
Activation for Quantized Neural Networks", 2018, arXiv:1805.06085.

Activations, unsigned (the paper's case, ReLU outputs), with the learned clip ``alpha``::

    y   = clamp(x, 0, alpha)
    y_q = round(y / s) * s,        s = alpha / (2^b - 1)          (= ONNX QDQ, zero point 0)

Gradients (the paper's straight-through estimator)::

    dy_q/dx     = 1 if 0 < x < alpha, else 0
    dy_q/dalpha = 1 if x >= alpha,    else 0

Signed activations (our extension, e.g. SiLU outputs): a second learned clip ``beta <= 0`` bounds
the range from below, ``y = clamp(x, beta, alpha)``; the grid is asymmetric with an integer zero
point, ``s = (alpha - beta) / (2^b - 1)``, ``zp = round(qmin - beta / s)``, and
``dy_q/dbeta = 1 if x <= beta``. (The grid's ends are ``beta`` and ``alpha`` rounded to a multiple
of ``s``, because 0 must be an exact code.)

Regularization: the paper adds an L2 penalty on ``alpha``; :meth:`PACTQuantizer.regularizer`
returns ``sum(alpha^2)`` (``+ sum(beta^2)`` when signed) so the training loop adds
``lambda * q.regularizer()`` to its loss.

Initialization: ``alpha = max(x)`` (and ``beta = min(min(x), 0)``) of the first batch, or
``alpha = init_alpha`` (``beta = -init_alpha``) when given; the paper starts from a constant
(``alpha = 10``), but a data range fits a network fine-tuned from a float checkpoint better.

Weights: the paper quantizes weights with DoReFa's ``tanh`` normalization, whose integer codes
are not a QDQ of the stored weight. Here the weight role is a symmetric max-abs quantizer, per
channel: ``s = max|w| / (2^(b-1) - 1)``, zero point 0, restricted range, recomputed from the
current weights on every training forward (frozen in eval), gradient ``dy/dw = 1``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fxfusion.quant.base import _MIN_SCALE, QParams, Quantizer
from fxfusion.quant.ste import _expand, fake_quantize

__all__ = ["PACTQuantizer"]


class PACTQuantizer(Quantizer):
    """PACT fake quantizer: a learned activation clip, uniform levels inside it.

    Args:
        bits, signed, role, per_channel, channels, axis: see :class:`Quantizer`; a signed
            activation learns a lower clip ``beta`` too (asymmetric grid), per-channel quantizers
            keep one clip (activations) or range (weights) per channel.
        init_alpha: constant initial clip; None initializes from the first batch.

    Learned parameters (activations): ``alpha`` and, when signed, ``beta``.
    Buffers (weights): ``running_min``, ``running_max`` (the current weights' range).

    Example:
        >>> q = PACTQuantizer(4, signed=False)
        >>> y = q(torch.relu(torch.randn(2, 8, 4, 4)))
        >>> loss = y.square().mean() + 1e-4 * q.regularizer()
    """

    signed_act_scheme = "asymmetric"
    range_names = ("alpha", "beta", "running_min", "running_max")

    def __init__(self, bits: int, *, init_alpha: float | None = None, **config: Any) -> None:
        super().__init__(bits, **config)
        if init_alpha is not None and not init_alpha > 0:
            raise ValueError(f"PACTQuantizer: init_alpha={init_alpha!r} must be > 0, e.g. 6.0")
        self.init_alpha = init_alpha
        if init_alpha is not None and self.role == "act":
            with torch.no_grad():
                self._set_clip(torch.tensor(-float(init_alpha)), torch.tensor(float(init_alpha)))

    def _make_params(self) -> None:
        if self.role == "weight":
            self.register_buffer("running_min", torch.zeros(self.param_shape))
            self.register_buffer("running_max", torch.ones(self.param_shape))
            return
        self.alpha = nn.Parameter(torch.ones(self.param_shape))
        if self.scheme == "asymmetric":
            self.beta = nn.Parameter(torch.full(self.param_shape, -1.0))

    def _set_clip(self, lo: Tensor, hi: Tensor) -> None:
        """Activations: ``alpha = hi`` and, when signed, ``beta = min(lo, 0)``."""
        self.alpha.copy_(hi.clamp(min=_MIN_SCALE))
        if self.scheme == "asymmetric":
            self.beta.copy_(lo.clamp(max=0))

    def _initialize(self, x: Tensor) -> None:
        lo, hi = self._reduce_min_max(x)
        if self.role == "weight":
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
        elif self.init_alpha is None:
            self._set_clip(lo, hi)

    def _quantize(self, x: Tensor) -> Tensor:
        if self.role == "weight":
            if self.training:
                self._initialize(x.detach())
            return fake_quantize(x, *self._scale_zero_point(), self.qmin, self.qmax, self.axis)
        value = fake_quantize(x.detach(), *self._scale_zero_point(), self.qmin, self.qmax, self.axis)
        # The straight-through surrogate: clamp(x, lower, alpha) written with where, so that
        # alpha gets gradient 1 exactly where x >= alpha (and beta where x <= beta).
        alpha = _expand(self.alpha, x, self.axis)
        clipped = torch.where(x >= alpha, alpha, x)
        if self.scheme == "asymmetric":
            beta = _expand(self.beta, x, self.axis)
            clipped = torch.where(x <= beta, beta, clipped)
        else:
            clipped = torch.where(x <= 0, torch.zeros_like(x), clipped)
        return clipped + (value - clipped).detach()

    def _scale_zero_point(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if self.role == "weight":
                return self._affine(self.running_min, self.running_max)
            lower = self.beta if self.scheme == "asymmetric" else torch.zeros_like(self.alpha)
            return self._affine(lower, self.alpha)

    def regularizer(self) -> Tensor:
        """The paper's L2 penalty on the clip: ``sum(alpha^2)`` (``+ sum(beta^2)`` if signed).

        Add ``lambda * q.regularizer()`` to the loss. Zero for the weight role.
        """
        if self.role == "weight":
            return self.running_max.new_zeros(())
        penalty = self.alpha.square().sum()
        if self.scheme == "asymmetric":
            penalty = penalty + self.beta.square().sum()
        return penalty

    def qparams(self) -> QParams:
        """Activations: ``scale = (alpha - lower) / (qmax - qmin)``; weights: max-abs scale."""
        self._require_initialized()
        return self._qparams(*self._scale_zero_point())
