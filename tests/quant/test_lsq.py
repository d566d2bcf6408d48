"""Tests of fxfusion/quant/lsq.py against hand-computed values and the paper's gradients."""

from __future__ import annotations

import math

import pytest
import torch

from fxfusion.quant import LSQQuantizer


def test_forward_unsigned_by_hand(primed) -> None:
    q = primed(LSQQuantizer(2, signed=False), step=0.5)  # codes 0..3
    x = torch.tensor([-0.3, 0.2, 0.26, 0.74, 1.6, 3.0])
    # x/s = -0.6, 0.4, 0.52, 1.48, 3.2, 6 -> clamp [0, 3] -> round 0, 0, 1, 1, 3, 3
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 0.5, 0.5, 1.5, 1.5]))


def test_forward_signed_activation_rounds_half_to_even(primed) -> None:
    q = primed(LSQQuantizer(3, signed=True), step=0.25)  # codes -4..3 (full signed range)
    x = torch.tensor([-2.0, -0.6, -0.125, 0.125, 0.375, 0.9])
    # x/s = -8, -2.4, -0.5, 0.5, 1.5, 3.6 -> clamp -> round -4, -2, -0, 0, 2, 3
    torch.testing.assert_close(q(x), torch.tensor([-1.0, -0.5, 0.0, 0.0, 0.5, 0.75]))


def test_forward_per_channel_weight_by_hand(primed) -> None:
    q = primed(LSQQuantizer(2, signed=True, per_channel=True, channels=2), step=[0.5, 2.0])
    assert (q.qmin, q.qmax) == (-1, 1)  # restricted symmetric weight range
    w = torch.tensor([[0.3, -0.2, 9.0], [0.3, -1.1, -9.0]])
    torch.testing.assert_close(q(w), torch.tensor([[0.5, -0.0, 0.5], [0.0, -2.0, -2.0]]))


def test_init_is_two_mean_abs_over_sqrt_qp() -> None:
    q = LSQQuantizer(3, signed=True)  # Qp = 3
    q(torch.tensor([1.0, -2.0, 3.0, -4.0]))  # mean |x| = 2.5
    torch.testing.assert_close(q.step.detach(), torch.tensor(5.0 / math.sqrt(3.0)))

    w = LSQQuantizer(4, signed=True, per_channel=True, channels=2)  # Qp = 7
    w(torch.tensor([[1.0, -1.0], [2.0, 6.0]]))  # per-channel mean |w| = 1, 4
    torch.testing.assert_close(w.step.detach(), torch.tensor([2.0, 8.0]) / math.sqrt(7.0))
    assert bool(w.initialized)


def _paper_grads(x, s, qmin, qmax, upstream, g):
    """LSQ eq. 3 with the gradient scale: (input grad, step grad per element)."""
    v = x / s
    inside = (v >= qmin) & (v <= qmax)
    dstep = torch.where(inside, torch.round(v) - v, torch.where(v < qmin, float(qmin), float(qmax)))
    return upstream * inside, upstream * dstep * g


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_gradients_match_the_paper_per_tensor(primed, bits: int, signed: bool) -> None:
    q = LSQQuantizer(bits, signed=signed)
    step = 0.1
    primed(q, step=step)
    x = (torch.randn(3, 50) * 0.1 * 2**bits).requires_grad_()
    upstream = torch.randn_like(x)
    q(x).backward(upstream)
    g = 1.0 / math.sqrt(x.numel() * q.qmax)
    dx, dstep = _paper_grads(x.detach(), torch.tensor(step), q.qmin, q.qmax, upstream, g)
    assert bool(((x.detach() / step < q.qmin) | (x.detach() / step > q.qmax)).any())  # both regimes
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(q.step.grad, dstep.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gradients_match_the_paper_per_channel(primed, bits: int) -> None:
    steps = torch.tensor([0.05, 0.2, 1.0])
    q = primed(LSQQuantizer(bits, signed=True, per_channel=True, channels=3, axis=1), step=steps)
    x = (torch.randn(4, 3, 5) * 2**bits * 0.1).requires_grad_()
    upstream = torch.randn_like(x)
    q(x).backward(upstream)
    g = 1.0 / math.sqrt(4 * 5 * q.qmax)  # N = numel of one channel
    dx, dstep = _paper_grads(x.detach(), steps.reshape(1, 3, 1), q.qmin, q.qmax, upstream, g)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(q.step.grad, dstep.sum(dim=(0, 2)), rtol=1e-4, atol=1e-6)


def test_qparams_are_the_step(primed) -> None:
    q = primed(LSQQuantizer(4, signed=True, per_channel=True, channels=2, axis=0), step=[0.1, 0.3])
    qp = q.qparams()
    torch.testing.assert_close(qp.scale, torch.tensor([0.1, 0.3]))
    assert qp.zero_point.tolist() == [0, 0] and (qp.qmin, qp.qmax, qp.axis, qp.bits) == (-7, 7, 0, 4)
    assert not qp.scale.requires_grad
