"""The fake-quantizer protocol, its parameters record, integer ranges and the base class.

Every quantizer in fxfusion fake-quantizes in ``forward`` (it returns a float tensor that lies on
a quantization grid) and describes that grid with :meth:`qparams` so that the exporter can emit
ONNX ``QuantizeLinear``/``DequantizeLinear`` nodes that compute the same numbers.

For a uniform quantizer the forward value is exactly the ONNX QDQ pair
(``onnx/reference/ops/op_quantize_linear.py``)::

    q = clamp(rint(x / scale) + zero_point, qmin, qmax)      # QuantizeLinear, rint = half to even
    y = (q - zero_point) * scale                              # DequantizeLinear

``torch.round`` rounds half to even like ``rint``; :func:`fake_quantize` is that formula with a
straight-through gradient for the rounding (it and the other straight-through helpers live in
:mod:`fxfusion.quant.ste`; they are re-exported here).

Integer ranges (:func:`qrange`):

- unsigned: ``(0, 2^b - 1)``, used for non-negative tensors (ReLU outputs), zero point 0;
- signed: ``(-2^(b-1), 2^(b-1) - 1)``, used for signed activations;
- signed *restricted*: ``(-(2^(b-1) - 1), 2^(b-1) - 1)``, used for weights. Dropping the most
  negative code makes the grid symmetric around 0 (``-qmax .. qmax``), so a weight and its
  negation quantize to negated codes and zero point 0 is exact.

Each quantizer picks one *scheme* from its role and signedness (``Quantizer.scheme``):

- ``"unsigned"``: unsigned range, zero point 0 (``signed=False``);
- ``"symmetric"``: signed range, zero point 0 (all signed weights, restricted range; signed LSQ
  and N2UQ activations, full signed range);
- ``"asymmetric"``: signed range with an integer zero point (signed min/max, PACT and DSQ
  activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fxfusion.quant.ste import clip, fake_quantize, grad_scale, round_ste

__all__ = [
    "DEFAULT_RANGE_NAMES",
    "MAX_BITS",
    "MIN_BITS",
    "QParams",
    "Quantizer",
    "QuantizerProtocol",
    "check_bits",
    "clip",
    "fake_quantize",
    "grad_scale",
    "is_quantizer",
    "qrange",
    "range_tensors",
    "round_ste",
]

MIN_BITS = 2
MAX_BITS = 8
ROLES = ("weight", "act")
SCHEMES = ("unsigned", "symmetric", "asymmetric")

# Smallest step any quantizer uses: keeps x / scale finite when the data are all zeros.
_MIN_SCALE = 1e-8

# The names under which quantizers conventionally keep the tensors that scale their grid as a
# whole; :func:`range_tensors` falls back to them for a quantizer without ``range_names``.
DEFAULT_RANGE_NAMES: tuple[str, ...] = ("step", "running_min", "running_max", "upper", "lower")


# --------------------------------------------------------------------------- validation, ranges


def check_bits(bits: object, name: str = "bits") -> int:
    """Validate a bit width and return it.

    Args:
        bits: the requested bit width.
        name: the argument's name in the messages (e.g. ``"w_bits"``).

    Returns:
        ``bits`` unchanged, once it is known to be an ``int`` in ``2..8``.

    Raises:
        TypeError: ``bits`` is not an ``int`` (``bool`` is refused too).
        ValueError: ``bits`` is outside ``2..8``.

    Example:
        >>> check_bits(4)
        4
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(
            f"{name} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r} "
            f"({type(bits).__name__}); pass e.g. {name}=4"
        )
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name}={bits} is out of range: fxfusion quantizers accept {MIN_BITS}..{MAX_BITS} bits; "
            f"pass an integer in that range, e.g. {name}=4 (1-bit and >8-bit grids are not supported)"
        )
    return bits


def qrange(bits: int, signed: bool, *, restricted: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide code.

    Args:
        bits: bit width, 2..8.
        signed: signed two's-complement range if True, else unsigned.
        restricted: for signed ranges, drop the most negative code so that the range is
            symmetric, ``(-(2^(b-1)-1), 2^(b-1)-1)``. Weights use it (see the module docstring).

    Returns:
        ``(qmin, qmax)``.

    Example:
        >>> qrange(4, False), qrange(4, True), qrange(4, True, restricted=True)
        ((0, 15), (-8, 7), (-7, 7))
    """
    check_bits(bits)
    if not signed:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if restricted else -qmax - 1), qmax


# --------------------------------------------------------------------------- parameters record


@dataclass(frozen=True, eq=False)
class QParams:
    """What a quantizer's grid is, in ONNX QuantizeLinear/DequantizeLinear terms.

    Attributes:
        scale: float tensor, shape ``()`` per tensor or ``(C,)`` per channel.
        zero_point: int64 tensor of the same shape as ``scale``.
        qmin, qmax: the integer range (``qmin < 0`` means a signed integer type).
        axis: the channel axis for per-channel parameters, else None.
        bits: the bit width.
        thresholds: N2UQ activations only: the sorted input thresholds ``t_0 < ... < t_{L-2}``
            (``L = qmax - qmin + 1`` levels). The integer code is ``qmin + #{k : x > t_k}``, then
            ``DequantizeLinear(code, scale, zero_point)``.
        levels: optional, the output values ``(code - zero_point) * scale`` for every code, shape
            ``(L,)`` (set by N2UQ activations).

    Example:
        >>> qp = QParams(torch.tensor(0.5), torch.tensor(0), 0, 15, None, 4)
        >>> qp.qmax
        15
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    axis: int | None
    bits: int
    thresholds: Tensor | None = None
    levels: Tensor | None = None

    def __post_init__(self) -> None:
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(
                f"QParams: scale shape {tuple(self.scale.shape)} and zero_point shape "
                f"{tuple(self.zero_point.shape)} differ; give both shape () or both (C,)"
            )
        if self.scale.dim() > 1:
            raise ValueError(
                f"QParams: scale must have shape () or (C,), got {tuple(self.scale.shape)}"
            )
        if self.zero_point.dtype != torch.int64:
            raise ValueError(
                f"QParams: zero_point must be int64, got {self.zero_point.dtype}; "
                f"use zero_point.to(torch.int64)"
            )
        if self.scale.dim() == 1 and self.axis is None:
            raise ValueError("QParams: a per-channel scale of shape (C,) needs an axis")
        if not self.qmin < self.qmax:
            raise ValueError(f"QParams: qmin={self.qmin} must be below qmax={self.qmax}")

    @property
    def per_channel(self) -> bool:
        """True when ``scale`` has one entry per channel."""
        return self.scale.dim() == 1


# --------------------------------------------------------------------------- protocol and base


@runtime_checkable
class QuantizerProtocol(Protocol):
    """What any fake quantizer must provide to plug into fxfusion.

    A built-in quantizer, a user's module, or an adapter around another library's fake-quantize
    module all qualify when they have these attributes and methods.

    Attributes:
        bits: the bit width, 2..8.
        signed: whether the integer codes are signed.
        per_channel: one scale per channel along ``axis`` if True, else one per tensor.
        axis: the channel axis when ``per_channel``, else None.
        enabled: when False, ``forward`` returns its input unchanged.

    Methods:
        forward(x): fake quantization, a float tensor on the grid that ``qparams()`` describes.
        qparams(): the grid as a :class:`QParams`.
    """

    bits: int
    signed: bool
    per_channel: bool
    axis: int | None
    enabled: bool

    def forward(self, x: Tensor) -> Tensor: ...

    def qparams(self) -> QParams: ...


class Quantizer(nn.Module):
    """Base class of the built-in fake quantizers; implements :class:`QuantizerProtocol`.

    It validates the configuration, holds the explicit state (``bits``, ``signed``, ``role``,
    ``scheme``, ``qmin``/``qmax``, ``per_channel``, ``channels``, ``axis``, ``enabled``) and the
    ``initialized`` buffer, and runs the one-time data initialization. A subclass sets the class
    attributes ``signed_act_scheme`` and ``range_names`` and implements ``_make_params()``
    (creates its parameters and buffers once the configuration is known; the constructor calls
    it, so a subclass without extra arguments needs no ``__init__``), ``_initialize(x)``
    (data-dependent init, runs once under ``no_grad``), ``_quantize(x)`` (the fake-quantization
    math) and ``qparams()``.

    ``initialized`` is a bool tensor buffer, so it is saved and restored by ``state_dict``. The
    first ``forward`` while it is False initializes the learned parameters from that batch; this is
    normally the first training step (an eval-mode forward of a never-initialized quantizer also
    initializes it, once, rather than quantizing with placeholder values). When that first forward
    runs inside a ``DistributedDataParallel`` forward, every rank then takes rank 0's initialized
    parameters and buffers (one broadcast per quantizer, once): each rank saw different data, and
    DDP syncs only buffers after construction, so the learned ranges would otherwise differ.

    Args:
        bits: bit width, 2..8.
        signed: signed integer codes (see the module docstring for the resulting scheme).
        role: ``"weight"`` or ``"act"``. Default: ``"weight"`` when ``per_channel`` else ``"act"``.
        per_channel: one set of parameters per channel along ``axis``.
        channels: the number of channels, required when ``per_channel``.
        axis: the channel axis, default 0 when ``per_channel``; must be None otherwise.
        signed_act_scheme: overrides the class attribute of the same name (kept for subclasses
            that pass it to ``super().__init__``); None, the default, keeps the class's choice.
        pow2: restrict the scale to a power of two (TQT-style): ``forward`` and ``qparams``
            use ``2^round(log2 s)`` of the learned scale ``s``, with a straight-through gradient.
            With power-of-two scales a conv or linear layer on quantized inputs sums exact
            products, so onnxruntime and PyTorch compute the same bits (see
            :func:`fxfusion.verify_onnx`); default False, a free float scale.

    Attributes:
        signed_act_scheme: class attribute, the scheme of a signed activation,
            ``"symmetric"`` or ``"asymmetric"`` (each method fixes it).
        range_names: class attribute, the names of the tensors that scale the grid as a whole
            (multiplying them all by ``m`` stretches the grid by ``m``); see :func:`range_tensors`.
    """

    signed_act_scheme: str = "symmetric"
    range_names: tuple[str, ...] = DEFAULT_RANGE_NAMES
    pow2: bool = False  # also the value of a quantizer pickled before the option existed

    def __init__(
        self,
        bits: int,
        *,
        signed: bool,
        role: str | None = None,
        per_channel: bool = False,
        channels: int | None = None,
        axis: int | None = None,
        signed_act_scheme: str | None = None,
        pow2: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.bits = check_bits(bits)
        if not isinstance(pow2, bool):
            raise TypeError(f"{name}: pow2 must be a bool, got {pow2!r}")
        self.pow2 = pow2
        if not isinstance(signed, bool):
            raise TypeError(f"{name}: signed must be a bool, got {signed!r}")
        if role is None:
            role = "weight" if per_channel else "act"
        if role not in ROLES:
            raise ValueError(f"{name}: role={role!r} is not one of {ROLES}; pass role='weight' or role='act'")
        if per_channel:
            if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
                raise ValueError(
                    f"{name}: per_channel=True needs channels=<positive int> (e.g. the conv's "
                    f"out_channels), got channels={channels!r}"
                )
            axis = 0 if axis is None else axis
            if isinstance(axis, bool) or not isinstance(axis, int):
                raise TypeError(f"{name}: axis must be an int, got {axis!r}")
        elif channels is not None or axis is not None:
            raise ValueError(
                f"{name}: channels={channels!r} and axis={axis!r} apply only to per-channel "
                f"quantizers; pass per_channel=True, or leave channels and axis unset"
            )
        if signed_act_scheme is None:
            signed_act_scheme = self.signed_act_scheme
        if signed_act_scheme not in ("symmetric", "asymmetric"):
            raise ValueError(
                f"{name}: signed_act_scheme={signed_act_scheme!r} must be 'symmetric' or 'asymmetric'"
            )

        self.signed = signed
        self.role = role
        self.per_channel = bool(per_channel)
        self.channels = channels if per_channel else None
        self.axis = axis
        self.enabled = True
        if not signed:
            self.scheme = "unsigned"
        elif role == "weight":
            self.scheme = "symmetric"
        else:
            self.scheme = signed_act_scheme
        self.qmin, self.qmax = qrange(bits, signed, restricted=signed and role == "weight")
        self.register_buffer("initialized", torch.tensor(False))
        # A Python copy of the buffer, read on every forward: a tensor's truth value would be a
        # graph break under torch.compile (and a device sync); it is re-read from the buffer after
        # load_state_dict and reset().
        self._initialized = False
        self._make_params()

    def _make_params(self) -> None:
        """Hook: create the method's parameters and buffers (none here).

        The constructor calls it once the configuration (``role``, ``scheme``, ``param_shape``)
        is set, so one ``__init__`` serves every method; raise ValueError in it for a
        configuration the method cannot hold.
        """

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of one learned quantity: ``(channels,)`` per channel, ``()`` per tensor."""
        return (self.channels,) if self.per_channel else ()

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (identity when ``enabled`` is False).

        Args:
            x: a floating-point tensor of any shape; per-channel quantizers need
                ``x.shape[axis] == channels``.

        Returns:
            A tensor shaped like ``x`` on the quantization grid.
        """
        if not self.enabled:
            return x
        self._check_input(x)
        if x.numel() == 0:  # an empty batch has nothing to quantize and nothing to calibrate on
            return x
        if not self._initialized:
            if not bool(self.initialized):
                with torch.no_grad():
                    self._initialize(x.detach())
                    self.initialized.fill_(True)
                    _broadcast_if_under_ddp(self)
            self._initialized = True
        # Float32 parameters must not promote a half-precision activation.
        return self._quantize(x).to(x.dtype)

    @property
    def ready(self) -> bool:
        """Initialized: its range describes what ``forward`` does (the Python copy once a forward
        has read the buffer, so that a compiled graph does not read a tensor's truth value)."""
        return self._initialized or bool(self.initialized)

    def reset(self) -> None:
        """Forget the range: the next forward initializes the quantizer again from its input."""
        self.initialized.fill_(False)
        self._initialized = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = False  # the loaded buffer decides, at the next forward

    def qparams(self) -> QParams:
        """The grid that ``forward`` quantizes to (in eval mode for soft quantizers)."""
        raise NotImplementedError

    def _initialize(self, x: Tensor) -> None:
        raise NotImplementedError

    def _quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {_describe(x)}")
        if self.per_channel:
            if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
                raise ValueError(
                    f"{name}: axis={self.axis} does not exist in an input of shape "
                    f"{tuple(x.shape)}; pass the channel axis of the tensor being quantized"
                )
            if x.shape[self.axis] != self.channels:
                raise ValueError(
                    f"{name}: input has {x.shape[self.axis]} channels on axis {self.axis} "
                    f"(shape {tuple(x.shape)}) but the quantizer was built with "
                    f"channels={self.channels}; rebuild it with channels={x.shape[self.axis]}"
                )

    def _require_initialized(self) -> None:
        if not self.ready:
            raise RuntimeError(
                f"{type(self).__name__}.qparams(): the quantizer is not initialized yet; run one "
                f"forward pass on real data (a training step or a calibration batch) first"
            )

    def _reduce_abs_mean(self, x: Tensor) -> Tensor:
        """Mean of ``|x|`` per channel (shape ``(C,)``) or over the whole tensor (shape ``()``)."""
        view = _per_channel_view(x, self.axis if self.per_channel else None)
        return view.abs().mean(dim=1).reshape(self.param_shape)

    def _reduce_min_max(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Minimum and maximum of ``x`` per channel or over the whole tensor."""
        view = _per_channel_view(x, self.axis if self.per_channel else None)
        return view.amin(dim=1).reshape(self.param_shape), view.amax(dim=1).reshape(self.param_shape)

    def _numel_per_scale(self, x: Tensor) -> int:
        """How many elements of ``x`` share one scale (LSQ's ``N``)."""
        if self.per_channel:
            return max(1, x.numel() // x.shape[self.axis])
        return max(1, x.numel())

    def _constrain(self, scale: Tensor) -> Tensor:
        """The scale the grid uses: ``scale``, or with ``pow2`` its nearest power of two in log2.

        ``exp2`` of an integer-valued float is an exact power of two; the rounding of the exponent
        is straight-through, so the learned scale gets ``d 2^k / d s = 2^k / s`` as its gradient.
        """
        if not self.pow2:
            return scale
        return torch.exp2(round_ste(torch.log2(scale)))

    def _affine(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and integer zero point of this quantizer's scheme for the range ``[lo, hi]``.

        - unsigned: ``scale = hi / qmax``, zero point 0 (``lo`` is ignored, the range starts at 0);
        - symmetric: ``scale = max(|lo|, |hi|) / qmax``, zero point 0;
        - asymmetric: the range is first widened to contain 0 (so that 0 is exact and the zero
          point is inside ``[qmin, qmax]``), then ``scale = (hi - lo) / (qmax - qmin)`` and
          ``zero_point = round(qmin - lo / scale)``.

        ``scale`` keeps autograd history (DSQ learns through it); ``zero_point`` has none.
        """
        if self.scheme == "unsigned":
            scale = self._constrain((hi.clamp(min=0) / self.qmax).clamp(min=_MIN_SCALE))
            return scale, torch.zeros_like(scale, dtype=torch.int64)
        if self.scheme == "symmetric":
            scale = self._constrain((torch.maximum(lo.abs(), hi.abs()) / self.qmax).clamp(min=_MIN_SCALE))
            return scale, torch.zeros_like(scale, dtype=torch.int64)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = self._constrain(((hi - lo) / (self.qmax - self.qmin)).clamp(min=_MIN_SCALE))
        zero_point = torch.round(self.qmin - lo.detach() / scale.detach())
        zero_point = zero_point.clamp(self.qmin, self.qmax).to(torch.int64)
        return scale, zero_point

    def _qparams(self, scale: Tensor, zero_point: Tensor, **extra: Tensor | None) -> QParams:
        return QParams(
            scale=scale.detach().clone(),
            zero_point=zero_point.detach().clone().to(torch.int64),
            qmin=self.qmin,
            qmax=self.qmax,
            axis=self.axis,
            bits=self.bits,
            **extra,
        )

    def extra_repr(self) -> str:
        text = f"bits={self.bits}, signed={self.signed}, role={self.role!r}, scheme={self.scheme!r}"
        if self.per_channel:
            text += f", channels={self.channels}, axis={self.axis}"
        if self.pow2:
            text += ", pow2=True"
        if not self.enabled:
            text += ", enabled=False"
        return text


# --------------------------------------------------------------------------- recognizing quantizers


def is_quantizer(m: object) -> bool:
    """True when ``m`` is a module that implements :class:`QuantizerProtocol`.

    The passes use it to tell fake quantizers apart from other modules, whoever wrote them: a
    built-in :class:`Quantizer`, an :class:`~fxfusion.quant.AOFakeQuantizer` or a user's module.
    ``isinstance(m, QuantizerProtocol)`` alone only checks that the attributes exist, so any object
    with them would pass; a quantizer also has to be an ``nn.Module`` to live in a model.

    Example:
        >>> from fxfusion.quant import LSQQuantizer
        >>> is_quantizer(LSQQuantizer(4, signed=False)), is_quantizer(nn.ReLU())
        (True, False)
    """
    if isinstance(m, Quantizer):  # the common case, without the Protocol's slow attribute walk
        return True
    return isinstance(m, nn.Module) and isinstance(m, QuantizerProtocol)


def range_tensors(q: nn.Module) -> list[Tensor]:
    """The tensors of ``q`` that scale its grid as a whole, in ``q.range_names`` order.

    Multiplying all of them by ``m`` stretches the quantization range by ``m`` (deploy's range
    search does so). The names come from ``q.range_names``, or :data:`DEFAULT_RANGE_NAMES` for a
    quantizer that does not declare them; names ``q`` lacks, or that are not tensors, are skipped
    (e.g. PACT's ``beta`` of an unsigned activation). The tensors are returned, not copies.

    Example:
        >>> from fxfusion.quant import LSQQuantizer
        >>> [t.shape for t in range_tensors(LSQQuantizer(4, signed=True, per_channel=True, channels=3))]
        [torch.Size([3])]
    """
    names = getattr(q, "range_names", DEFAULT_RANGE_NAMES)
    return [t for t in (getattr(q, n, None) for n in names) if isinstance(t, Tensor)]


# --------------------------------------------------------------------------- data parallel


def _broadcast_if_under_ddp(module: nn.Module) -> None:
    """Inside a DDP forward, overwrite ``module``'s parameters and buffers with rank 0's.

    Only inside a DDP forward do all ranks run this init together, so the collective cannot
    hang; a forward on one rank alone (deploy's calibration, a rank-0 evaluation) never syncs.
    ``_get_active_ddp_module`` is DDP's own marker of that (torch >= 2.0; it serves TorchDynamo).
    """
    get_active = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    ddp = get_active() if get_active is not None else None
    if ddp is None or not dist.is_initialized():
        return
    group = ddp.process_group
    src = dist.get_global_rank(group, 0)
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.detach(), src, group=group)


# --------------------------------------------------------------------------- tensor helpers


def _per_channel_view(x: Tensor, axis: int | None) -> Tensor:
    """``x`` as a ``(C, N)`` matrix (one row per channel), or ``(1, N)`` when ``axis`` is None."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"
