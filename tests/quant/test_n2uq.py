"""Tests of fxfusion/quant/n2uq.py against hand-computed values and the paper's G-STE."""

from __future__ import annotations

import math

import pytest
import torch

from fxfusion.quant import N2UQQuantizer, fake_quantize

# 2-bit unsigned, start 0, widths 1, 2, 1, output step 0.5:
# interval bounds T = 0, 1, 3, 4; forward thresholds (midpoints) t = 0.5, 2, 3.5.
HAND = {"start": 0.0, "widths": [1.0, 2.0, 1.0], "step": 0.5}


def test_forward_by_hand(primed) -> None:
    q = primed(N2UQQuantizer(2, signed=False), **HAND)
    x = torch.tensor([-1.0, 0.5, 0.6, 2.0, 2.1, 3.6, 10.0])
    # code = #{t < x}: 0, 0, 1, 1, 2, 3, 3
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.5, 1.5]))
    qp = q.qparams()
    torch.testing.assert_close(qp.thresholds, torch.tensor([0.5, 2.0, 3.5]))
    torch.testing.assert_close(qp.levels, torch.tensor([0.0, 0.5, 1.0, 1.5]))
    assert (qp.scale.item(), qp.zero_point.item(), qp.qmin, qp.qmax) == (0.5, 0, 0, 3)


def test_signed_levels_by_hand(primed) -> None:
    q = primed(N2UQQuantizer(2, signed=True), **HAND)  # codes -2..1
    x = torch.tensor([-1.0, 0.6, 2.1, 3.6])
    torch.testing.assert_close(q(x), torch.tensor([-1.0, -0.5, 0.0, 0.5]))
    torch.testing.assert_close(q.qparams().levels, torch.tensor([-1.0, -0.5, 0.0, 0.5]))


# Per input: (x, dy/dx, dy/dstart, dy/da_0, dy/da_1, dy/da_2, dy/dstep), from the G-STE with
# s = 0.5, a = (1, 2, 1), T = (0, 1, 3, 4):
#   x in interval j: dy/dx = s/a_j, dy/dstart = -s/a_j, dy/da_i = -s/a_j (i < j),
#   -s (x - T_j)/a_j^2 (i = j); dy/dstep = code(x); all 0 outside [T_0, T_n].
G_STE_CASES = [
    (-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.5, 0.5, -0.5, -0.25, 0.0, 0.0, 0.0),
    (2.0, 0.25, -0.25, -0.25, -0.125, 0.0, 1.0),
    (3.5, 0.5, -0.5, -0.5, -0.5, -0.25, 2.0),
    (10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0),
]


@pytest.mark.parametrize(("x", "dx", "dstart", "da0", "da1", "da2", "dstep"), G_STE_CASES)
def test_generalized_ste_gradients_by_hand(primed, x, dx, dstart, da0, da1, da2, dstep) -> None:
    q = primed(N2UQQuantizer(2, signed=False), **HAND)
    xt = torch.tensor([x], requires_grad=True)
    q(xt).sum().backward()
    g = 1 / math.sqrt(1 * 3)  # LSQ's gradient scale 1/sqrt(N * qmax) on the learned parameters
    torch.testing.assert_close(xt.grad, torch.tensor([dx]))
    torch.testing.assert_close(q.start.grad, torch.tensor(dstart * g))
    torch.testing.assert_close(q.widths.grad, torch.tensor([da0, da1, da2]) * g)
    torch.testing.assert_close(q.step.grad, torch.tensor(dstep * g))


def test_backward_is_the_derivative_of_the_piecewise_linear_surrogate(primed) -> None:
    """G-STE: the gradient is the derivative of F(x) = s*(qmin + j + (x - T_j)/a_j)."""
    q = N2UQQuantizer(3, signed=True).double()
    primed(q, start=-1.0, widths=[0.1, 0.3, 0.2, 0.5, 0.25, 0.15, 0.4], step=0.3)
    x = torch.linspace(-1.5, 1.5, 61, dtype=torch.float64)

    def surrogate(x_, start, widths, step):
        bounds = start + torch.cat([widths.new_zeros(1), torch.cumsum(widths, 0)])
        j = torch.bucketize(x_, bounds) - 1
        jc = j.clamp(0, 6)
        ramp = jc + (x_ - bounds[jc]) / widths[jc]
        ramp = torch.where(j < 0, 0.0, torch.where(j >= 7, 7.0, ramp))
        return step * (-4 + ramp)

    def module(x_, start, widths, step):
        return torch.func.functional_call(q, {"start": start, "widths": widths, "step": step}, (x_,))

    params = [getattr(q, n).detach().clone().requires_grad_() for n in ("start", "widths", "step")]
    x_ = x.clone().requires_grad_()
    jac_module = torch.autograd.functional.jacobian(lambda *a: module(*a, params[2]), (x_, *params[:2]))
    jac_ramp = torch.autograd.functional.jacobian(lambda *a: surrogate(*a, params[2]), (x_, *params[:2]))
    g = 1 / math.sqrt(x.numel() * 3)  # the parameters' gradient scale 1/sqrt(N * qmax); x itself is unscaled
    for got, want, scale in zip(jac_module, jac_ramp, (1.0, g, g), strict=True):
        torch.testing.assert_close(got, want * scale)
    # And the surrogate itself is checked against finite differences.
    off_bounds = (x + 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: surrogate(*a, params[2]), (off_bounds, *params[:2]))


def test_uniform_init_is_round_to_nearest_with_identity_gradient() -> None:
    q = N2UQQuantizer(3, signed=False)
    x = torch.tensor([0.0, 0.3, 1.1, 2.6, 3.5])  # max 3.5 -> step 0.5
    q(x)
    torch.testing.assert_close(q.step.detach(), torch.tensor(0.5))
    torch.testing.assert_close(q.qparams().thresholds, torch.arange(7) * 0.5 + 0.25)
    x = torch.tensor([0.1, 0.8, 1.9, 3.0, 3.4], requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, fake_quantize(x.detach(), torch.tensor(0.5), torch.tensor(0), 0, 7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5))


def test_signed_init_covers_both_signs() -> None:
    q = N2UQQuantizer(2, signed=True)  # codes -2..1
    q(torch.tensor([-3.0, 0.5, 1.0]))  # step = max(1 / 1, -3 / -2) = 1.5
    torch.testing.assert_close(q.step.detach(), torch.tensor(1.5))
    torch.testing.assert_close(q.qparams().thresholds, torch.tensor([-2.25, -0.75, 0.75]))


def test_widths_stay_positive_so_thresholds_stay_sorted(primed) -> None:
    q = primed(N2UQQuantizer(2, signed=False), start=0.0, widths=[1.0, -5.0, 1.0], step=1.0)
    t = q.qparams().thresholds
    assert bool((t.diff() > 0).all())


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_scale_is_the_entropy_preserving_l1_scale(bits: int) -> None:
    q = N2UQQuantizer(bits, signed=True, per_channel=True, channels=3)
    w = torch.randn(3, 16, 3, 3) * torch.tensor([0.1, 1.0, 3.0]).reshape(3, 1, 1, 1)
    w.requires_grad_()
    y = q(w)
    gamma = (2**bits - 1) / 2 ** (bits - 1)
    expected = gamma * w.detach().abs().mean(dim=(1, 2, 3)) / (2 ** (bits - 1) - 1)
    torch.testing.assert_close(q.qparams().scale, expected)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(w.grad, torch.ones_like(w))  # STE for every weight


def test_weight_forward_by_hand() -> None:
    q = N2UQQuantizer(2, signed=True, per_channel=True, channels=1)  # codes -1..1
    w = torch.tensor([[0.5, -1.5, 1.0, -1.0]])  # mean |w| = 1, gamma = 1.5 -> scale 1.5
    torch.testing.assert_close(q(w), torch.tensor([[0.0, -1.5, 1.5, -1.5]]))
    assert q.qparams().thresholds is None


def test_thresholds_of_weight_quantizer_raise() -> None:
    with pytest.raises(ValueError, match="uniform"):
        N2UQQuantizer(4, signed=True, per_channel=True, channels=2).thresholds()
