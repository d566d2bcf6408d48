"""torch.ao fake-quantize modules behind fxfusion's :class:`QuantizerProtocol`.

``torch.ao.quantization.FakeQuantize`` (observer-driven) and ``_LearnableFakeQuantize`` (LSQ-style
learned scale and zero point) already fake-quantize; they only speak a different dialect.
:class:`AOFakeQuantizer` translates it::

    protocol            torch.ao module
    --------            ---------------
    forward(x)          fake_quant(x)
    bits                levels = quant_max - quant_min + 1, bits = ceil(log2(levels))
    signed              quant_min < 0
    per_channel, axis   qscheme is per channel, ch_axis
    enabled             fake_quant_enabled (the observer keeps its own switch)
    qparams()           calculate_qparams() -> QParams(scale, zero_point, quant_min, quant_max, ...)

:func:`ao_factory` turns two fake-quantize constructors (e.g. ``FakeQuantize.with_args(...)``)
into a quantizer factory for :func:`fxfusion.quantize`, filling in the integer range from the bit
width the pass asks for, with the same ranges as the built-in quantizers (:func:`qrange`: signed
weights on the restricted symmetric range, unsigned inputs after ReLU).

``torch.ao.quantization`` is deprecated upstream in favour of torchao but still ships with
torch 2.x; it is imported only when an adapter is built, so fxfusion imports without it.

Example:
    >>> from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
    >>> from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver
    >>> method = ao_factory(
    ...     FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
    ...                            qscheme=torch.per_channel_symmetric),
    ...     FakeQuantize.with_args(observer=MovingAverageMinMaxObserver),
    ... )
    >>> qat = fxfusion.quantize(fxfusion.rewrite(model, x), x, method=method, w_bits=4, a_bits=4)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fxfusion.quant.base import MAX_BITS, MIN_BITS, QParams, check_bits, qrange

__all__ = ["AOFakeQuantizer", "ao_factory"]

_PER_CHANNEL = ("per_channel_affine", "per_channel_symmetric")
_PER_TENSOR = ("per_tensor_affine", "per_tensor_symmetric")


class AOFakeQuantizer(nn.Module):
    """A ``torch.ao.quantization`` fake-quantize module as an fxfusion quantizer.

    Implements :class:`fxfusion.quant.QuantizerProtocol` by delegating to the wrapped module;
    the module's own observer, learning and fake-quant switches keep working as in torch.ao.

    Args:
        fake_quant: a ``FakeQuantize``, ``FusedMovingAvgObsFakeQuantize`` or
            ``_LearnableFakeQuantize`` instance (anything with ``quant_min``, ``quant_max``,
            ``qscheme``, ``ch_axis``, ``fake_quant_enabled`` and ``calculate_qparams()``)
            whose range spans 2..8 bits.

    Raises:
        ImportError: ``torch.ao.quantization`` is not available.
        TypeError: ``fake_quant`` is not a torch.ao fake-quantize module.
        ValueError: its range is not 2..8 bits, or its qscheme has no integer zero point.

    Example:
        >>> from torch.ao.quantization import FakeQuantize
        >>> q = AOFakeQuantizer(FakeQuantize(quant_min=0, quant_max=15))
        >>> y = q(torch.rand(4, 8))
        >>> q.bits, q.signed, q.qparams().qmax
        (4, False, 15)
    """

    # No tensor of this module scales the grid: the scale lives in the wrapped module, whose
    # observer recomputes it from the data on every forward while it observes (in eval too), so a
    # rescaled range would not last; see :func:`fxfusion.quant.range_tensors`.
    range_names: tuple[str, ...] = ()

    def __init__(self, fake_quant: nn.Module) -> None:
        super().__init__()
        base = _ao().FakeQuantizeBase
        if not isinstance(fake_quant, base):
            raise TypeError(
                f"AOFakeQuantizer wraps a torch.ao.quantization fake-quantize module (a FakeQuantizeBase), "
                f"got {type(fake_quant).__name__}; for another quantizer implement QuantizerProtocol directly"
            )
        qmin, qmax = _quant_range(fake_quant)
        scheme = str(getattr(fake_quant, "qscheme", "")).replace("torch.", "")
        if scheme not in _PER_CHANNEL + _PER_TENSOR:
            raise ValueError(
                f"AOFakeQuantizer: qscheme {scheme or '?'} of {type(fake_quant).__name__} has no integer zero "
                f"point that ONNX QuantizeLinear can carry; use one of {', '.join(_PER_CHANNEL + _PER_TENSOR)}"
            )
        levels = qmax - qmin + 1
        bits = (levels - 1).bit_length()  # ceil(log2(levels)): 15 levels (-7..7) are 4 bits
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"AOFakeQuantizer: quant range ({qmin}, {qmax}) of {type(fake_quant).__name__} is {bits} bits; "
                f"fxfusion quantizers span {MIN_BITS}..{MAX_BITS} bits, so give quant_min/quant_max in that range"
            )
        self.fake_quant = fake_quant
        self.bits = bits
        self.qmin, self.qmax = qmin, qmax
        self.signed = qmin < 0
        self.per_channel = scheme in _PER_CHANNEL
        self.axis = int(fake_quant.ch_axis) if self.per_channel else None

    @property
    def enabled(self) -> bool:
        """Fake quantization on (the wrapped module's ``fake_quant_enabled``)."""
        return bool(self.fake_quant.fake_quant_enabled[0])

    @enabled.setter
    def enabled(self, value: bool) -> None:
        # Only the fake quantization: torch.ao keeps observation and learning on separate switches.
        self.fake_quant.fake_quant_enabled[0] = 1 if value else 0

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped module's forward (identity when ``enabled`` is False)."""
        return self.fake_quant(x)

    def qparams(self) -> QParams:
        """The grid from the module's ``calculate_qparams()``, as :class:`QParams`.

        Raises:
            RuntimeError: an observer-driven module has not observed any data yet.
        """
        fq = self.fake_quant
        if _placeholder_qparams(fq):
            raise RuntimeError(
                f"AOFakeQuantizer({type(fq).__name__}).qparams(): its observer has seen no data yet, so scale "
                f"and zero point are placeholders; run one forward pass on real data first"
            )
        scale, zero_point = fq.calculate_qparams()
        scale = scale.detach().to(torch.float32).clone()
        zero_point = zero_point.detach().to(torch.int64).clone()
        if not self.per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return QParams(scale, zero_point, self.qmin, self.qmax, self.axis, self.bits)

    def extra_repr(self) -> str:
        text = f"bits={self.bits}, signed={self.signed}, qmin={self.qmin}, qmax={self.qmax}"
        if self.per_channel:
            text += f", axis={self.axis}"
        return text if self.enabled else text + ", enabled=False"


def ao_factory(
    weight_fq_ctor: Callable[..., nn.Module],
    act_fq_ctor: Callable[..., nn.Module],
) -> Callable[..., AOFakeQuantizer]:
    """A quantizer factory for :func:`fxfusion.quantize` built from torch.ao fake-quantize constructors.

    The pass calls the factory with ``bits``, ``role``, ``signed``, ``channels`` and ``axis``; it
    calls the matching constructor with ``quant_min``/``quant_max`` from :func:`qrange` (weights:
    the restricted signed range ``-(2^(b-1)-1)..2^(b-1)-1``; activations: ``0..2^b-1`` when unsigned,
    else ``-2^(b-1)..2^(b-1)-1``), ``dtype`` ``torch.qint8``/``torch.quint8`` to match, and, for
    per-channel weights, ``ch_axis`` (plus ``channel_len`` for ``_LearnableFakeQuantize``).
    Everything else (observer, qscheme, averaging constant, ``use_grad_scaling``) comes from the
    constructors, e.g. ``FakeQuantize.with_args(...)``.

    Args:
        weight_fq_ctor: builds the weight fake-quantizers; its qscheme should be per channel
            (``torch.per_channel_symmetric``) to match fxfusion's weight placement.
        act_fq_ctor: builds the input-activation fake-quantizers (per tensor).

    Returns:
        ``f(*, bits, role, signed, channels, axis) -> AOFakeQuantizer``.

    Raises:
        ImportError: ``torch.ao.quantization`` is not available.
        TypeError: a constructor is not callable.

    Example:
        >>> from torch.ao.quantization import MovingAverageMinMaxObserver as MinMax
        >>> from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver as PerChannelMinMax
        >>> from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize as LFQ
        >>> method = ao_factory(
        ...     LFQ.with_args(observer=PerChannelMinMax, qscheme=torch.per_channel_symmetric, use_grad_scaling=True),
        ...     LFQ.with_args(observer=MinMax, use_grad_scaling=True),
        ... )
        >>> qat = fxfusion.quantize(rewritten, x, method=method)  # doctest: +SKIP
    """
    _ao()
    for name, ctor in (("weight_fq_ctor", weight_fq_ctor), ("act_fq_ctor", act_fq_ctor)):
        if not callable(ctor):
            raise TypeError(
                f"ao_factory: {name} must be a fake-quantize constructor such as "
                f"FakeQuantize.with_args(...), got {type(ctor).__name__}"
            )

    def factory(*, bits: int, role: str, signed: bool, channels: int | None = None,
                axis: int | None = None) -> AOFakeQuantizer:
        if role not in ("weight", "act"):
            raise ValueError(f"ao_factory: role={role!r} is not valid; the pass asks for 'weight' or 'act'")
        ctor = weight_fq_ctor if role == "weight" else act_fq_ctor
        qmin, qmax = qrange(check_bits(bits), signed, restricted=signed and role == "weight")
        kwargs: dict[str, Any] = {"quant_min": qmin, "quant_max": qmax,
                                  "dtype": torch.qint8 if signed else torch.quint8}
        if channels is not None:
            kwargs["ch_axis"] = 0 if axis is None else axis
            if _is_learnable(ctor):
                kwargs["channel_len"] = channels
        return AOFakeQuantizer(ctor(**kwargs))

    return factory


# --- helpers --------------------------------------------------------------------------------


def _ao():
    """``torch.ao.quantization``, imported on first use."""
    try:
        import torch.ao.quantization as ao_quantization
    except ImportError as e:
        raise ImportError(
            f"fxfusion.quant.ao needs torch.ao.quantization, which this torch ({torch.__version__}) does not "
            f"provide; use a torch build that ships it, or fxfusion's own quantizers (method='lsq', ...)"
        ) from e
    return ao_quantization


def _quant_range(fq: nn.Module) -> tuple[int, int]:
    # FakeQuantize keeps quant_min/max for backward compatibility; its observer holds the truth.
    source = getattr(fq, "activation_post_process", None)
    qmin = getattr(source, "quant_min", None)
    qmax = getattr(source, "quant_max", None)
    if qmin is None or qmax is None:
        qmin, qmax = fq.quant_min, fq.quant_max
    return int(qmin), int(qmax)


def _placeholder_qparams(fq: nn.Module) -> bool:
    """True while scale and zero point are still waiting for the observer's first batch.

    A ``_LearnableFakeQuantize`` in learning mode (``static_enabled`` off) starts from the scale it
    was given, which is a real grid; every other module takes its grid from the observer.
    """
    observer = getattr(fq, "activation_post_process", None)
    low = getattr(observer, "min_val", None)
    empty = isinstance(low, Tensor) and (low.numel() == 0 or not bool(torch.isfinite(low).all()))
    static = getattr(fq, "static_enabled", None)
    return empty and (static is None or bool(static[0]))


def _is_learnable(ctor: Callable[..., nn.Module]) -> bool:
    """Does ``ctor`` build a ``_LearnableFakeQuantize`` (which needs ``channel_len`` per channel)?"""
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    target = ctor
    for _ in range(8):  # unwrap with_args (_PartialWrapper) and functools.partial layers
        if isinstance(target, type):
            return issubclass(target, _LearnableFakeQuantize)
        if isinstance(target, functools.partial):
            target = target.func
        elif hasattr(target, "p") and isinstance(target.p, functools.partial):
            target = target.p.func
        else:
            return False
    return False
