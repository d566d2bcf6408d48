"""Fake quantizers for QAT: LSQ, PACT, DSQ, N2UQ and a min/max STE baseline.

They share :class:`QuantizerProtocol` (fake-quantize in ``forward``, describe the grid with
``qparams()``); any module with that protocol plugs into fxfusion in their place, and
:func:`is_quantizer` recognizes it. :func:`range_tensors` gives the tensors that scale a
quantizer's grid (named by its ``range_names``).
:func:`make_quantizer` builds one by name from the :data:`QUANTIZERS` dict; :func:`ao_factory` wraps
torch.ao fake quantizers in the same protocol.
"""

from __future__ import annotations

from fxfusion.quant.ao import AOFakeQuantizer, ao_factory
from fxfusion.quant.base import (
    MAX_BITS,
    MIN_BITS,
    QParams,
    Quantizer,
    QuantizerProtocol,
    check_bits,
    fake_quantize,
    grad_scale,
    is_quantizer,
    qrange,
    range_tensors,
    round_ste,
)
from fxfusion.quant.dsq import DSQQuantizer
from fxfusion.quant.lsq import LSQQuantizer
from fxfusion.quant.minmax import MinMaxQuantizer
from fxfusion.quant.n2uq import N2UQQuantizer
from fxfusion.quant.pact import PACTQuantizer

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "QUANTIZERS",
    "AOFakeQuantizer",
    "DSQQuantizer",
    "LSQQuantizer",
    "MinMaxQuantizer",
    "N2UQQuantizer",
    "PACTQuantizer",
    "QParams",
    "Quantizer",
    "QuantizerProtocol",
    "ao_factory",
    "check_bits",
    "fake_quantize",
    "grad_scale",
    "is_quantizer",
    "make_quantizer",
    "qrange",
    "range_tensors",
    "round_ste",
]

QUANTIZERS: dict[str, type[Quantizer]] = {
    "lsq": LSQQuantizer,
    "pact": PACTQuantizer,
    "dsq": DSQQuantizer,
    "n2uq": N2UQQuantizer,
    "minmax": MinMaxQuantizer,
}


def make_quantizer(
    method: str,
    *,
    bits: int,
    role: str,
    signed: bool,
    channels: int | None = None,
    axis: int | None = None,
    **options: object,
) -> Quantizer:
    """Build a built-in quantizer by method name.

    Args:
        method: a key of :data:`QUANTIZERS` (``"lsq"``, ``"pact"``, ``"dsq"``, ``"n2uq"``,
            ``"minmax"``), case-insensitive.
        bits: bit width, 2..8.
        role: ``"weight"`` or ``"act"``.
        signed: signed integer codes.
        channels: number of channels for a per-channel quantizer (weights); None = per tensor.
        axis: the channel axis when ``channels`` is given (default 0).
        **options: method-specific keyword arguments (e.g. ``init_alpha`` for PACT,
            ``soft_forward`` for DSQ, ``momentum`` for min/max).

    Returns:
        The quantizer module.

    Raises:
        ValueError: unknown method or role, bad bits, or inconsistent channels/axis.

    Example:
        >>> wq = make_quantizer("lsq", bits=4, role="weight", signed=True, channels=16)
        >>> aq = make_quantizer("pact", bits=4, role="act", signed=False)
    """
    key = method.lower() if isinstance(method, str) else method
    if key not in QUANTIZERS:
        raise ValueError(
            f"unknown quantizer method {method!r}; valid methods: {', '.join(sorted(QUANTIZERS))}. "
            f"For another technique, pass a module that implements QuantizerProtocol"
        )
    if role not in ("weight", "act"):
        raise ValueError(f"role={role!r} is not valid; pass role='weight' or role='act'")
    if channels is None and axis is not None:
        raise ValueError(f"axis={axis!r} needs channels=<int>; give both for per-channel quantization")
    return QUANTIZERS[key](
        bits,
        signed=signed,
        role=role,
        per_channel=channels is not None,
        channels=channels,
        axis=axis,
        **options,
    )
