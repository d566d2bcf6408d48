"""Straight-through building blocks: rounding, clipping, gradient scaling and the QDQ formula.

Stateless functions every quantizer composes. Each one is exact in forward (bit for bit what the
ONNX ``QuantizeLinear``/``DequantizeLinear`` pair or ``torch.clamp`` computes) and puts its own
gradient convention in backward, the same on every torch version.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clip", "fake_quantize", "grad_scale", "round_ste"]


def round_ste(x: Tensor) -> Tensor:
    """``torch.round`` (half to even) in forward, identity gradient in backward.

    Example:
        >>> round_ste(torch.tensor([0.5, 1.5, 2.4]))
        tensor([0., 2., 2.])
    """
    # r + (x − x) is exactly r in forward; x + (r − x) can be off by one ulp (breaks export parity)
    return torch.round(x).detach() + (x - x.detach())


def clip(x: Tensor, lo: float | Tensor, hi: float | Tensor) -> Tensor:
    """``torch.clamp(x, lo, hi)`` in forward, with one gradient convention on every torch version.

    ``x`` gets gradient 1 on the closed interval ``[lo, hi]`` and 0 outside; a tensor bound gets
    gradient 1 where it is the output (``x < lo``, ``x > hi``). ``torch.clamp``'s own convention
    at ``x == bound`` changed in torch 2.14 (0, or ½ to each side with tensor bounds, where 2.13
    gave 1 to ``x``): a weight at the edge of its grid, as after a max-abs initialization, would
    stop learning on one version and not on the other.

    Example:
        >>> x = torch.tensor([-1.0, 0.0, 2.0, 3.0, 4.0], requires_grad=True)
        >>> clip(x, 0, 3).sum().backward()
        >>> x.grad
        tensor([0., 1., 1., 1., 0.])
    """
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def grad_scale(x: Tensor, scale: float | Tensor) -> Tensor:
    """Return ``x`` unchanged in forward and multiply its gradient by ``scale`` in backward.

    LSQ uses it to scale the step-size gradient by ``g = 1 / sqrt(N * Qp)``.

    Example:
        >>> s = torch.tensor(2.0, requires_grad=True)
        >>> grad_scale(s, 0.5).backward(); s.grad
        tensor(0.5000)
    """
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())  # exactly x in forward, gradient × scale


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> Tensor:
    """ONNX QuantizeLinear followed by DequantizeLinear, with a straight-through rounding.

    Forward: ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.
    Backward: the rounding is the identity, the clamp passes gradient where the rounded code is
    inside ``[qmin, qmax]``; ``scale`` receives its autograd gradient unless it is detached.

    Args:
        x: input of any shape.
        scale: shape ``()`` (per tensor) or ``(C,)`` (per channel along ``axis``).
        zero_point: integer-valued tensor of the same shape as ``scale``.
        qmin, qmax: the integer range.
        axis: the channel axis of ``x`` when ``scale`` is per channel.

    Returns:
        A float tensor shaped like ``x`` whose values lie on the grid.

    Example:
        >>> fake_quantize(torch.tensor([0.26, 9.0]), torch.tensor(0.5), torch.tensor(0), 0, 3)
        tensor([0.5000, 1.5000])
    """
    scale = _expand(scale, x, axis)
    zero_point = _expand(zero_point, x, axis).to(scale.dtype)
    code = clip(round_ste(x / scale) + zero_point, qmin, qmax)
    return (code - zero_point) * scale


def _expand(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Reshape a ``()`` or ``(C,)`` parameter so that it broadcasts along ``axis`` of ``x``."""
    if p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)
