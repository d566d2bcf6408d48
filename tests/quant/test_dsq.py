"""Tests of fxfusion/quant/dsq.py against hand-computed values and the paper's soft quantizer."""

from __future__ import annotations

import math

import pytest
import torch

from fxfusion.quant import DSQQuantizer


def _paper_q_s(x, lower, upper, alpha, intervals):
    """The paper's Q_S (eqs. 3-5), written independently of the module, elementwise."""
    delta = (upper - lower) / intervals
    k = torch.log(2 / alpha - 1) / delta
    s = 1 / (1 - alpha)
    out = []
    for v in x:
        if v < lower:
            out.append(lower * 1.0)
        elif v > upper:
            out.append(upper * 1.0)
        else:
            i = min(int(torch.floor((v - lower) / delta)), intervals - 1)
            m = lower + (i + 0.5) * delta
            phi = s * torch.tanh(k * (v - m))
            out.append(lower + delta * (i + (phi + 1) / 2))
    return torch.stack(out)


def test_soft_forward_by_hand(primed) -> None:
    # 2 bits unsigned, u = 3: delta = 1; alpha = 0.2: k delta = log 9, s = 1.25, and
    # tanh(log(9) / 4) = tanh(log(3) / 2) = 0.5, so phi = +-0.625 a quarter step from a midpoint.
    q = primed(DSQQuantizer(2, signed=False, alpha=0.2), upper=3.0).train()
    x = torch.tensor([-1.0, 0.5, 1.0, 1.25, 2.75, 5.0])
    expected = torch.tensor([0.0, 0.5, 1.0, 1.0 + 0.375 / 2, 2.0 + 1.625 / 2, 3.0])
    torch.testing.assert_close(q(x), expected)


def test_eval_forward_is_the_hard_grid_by_hand(primed) -> None:
    q = primed(DSQQuantizer(2, signed=False), upper=3.0).eval()
    x = torch.tensor([-1.0, 0.4, 0.5, 1.25, 1.5, 2.75, 5.0])
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 3.0]))
    qp = q.qparams()
    assert (qp.scale.item(), qp.zero_point.item(), qp.qmin, qp.qmax) == (1.0, 0, 0, 3)


def test_input_gradient_by_hand(primed) -> None:
    q = primed(DSQQuantizer(2, signed=False, alpha=0.2), upper=3.0).train()
    x = torch.tensor([1.25, 0.5, -1.0, 4.0], requires_grad=True)
    q(x).sum().backward()
    # dQ/dx = delta/2 * s * k * (1 - tanh^2) = 1/2 * 1.25 * log 9 * (1 - 0.25) at 1.25,
    # and 1/2 * 1.25 * log 9 at a midpoint; 0 outside [l, u].
    expected = torch.tensor([0.46875 * math.log(9), 0.625 * math.log(9), 0.0, 0.0])
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_soft_forward_matches_the_paper_asymmetric(primed, bits: int) -> None:
    n = 2**bits - 1
    # Choose l on the grid (l / delta integer) so that the zero-point rounding does not move it.
    lower, upper = -0.6, 0.6 * (n - 3) / 3  # delta = 0.2 * ... : l = -3 delta
    q = primed(DSQQuantizer(bits, signed=True, alpha=0.3), lower=lower, upper=upper).train()
    x = torch.linspace(lower - 0.5, upper + 0.5, 97, dtype=torch.float64)
    ref = _paper_q_s(x, torch.tensor(lower, dtype=torch.float64), torch.tensor(upper, dtype=torch.float64),
                     torch.tensor(0.3, dtype=torch.float64), n)
    torch.testing.assert_close(q(x.float()), ref.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_parameter_gradients_match_the_paper_formula(primed, bits: int) -> None:
    """Autograd of the module vs autograd of the independent Q_S, for l, u, alpha and x."""
    n = 2**bits - 1
    lower, upper, alpha = -0.4, 0.4 * (n - 2) / 2, 0.25  # l = -2 delta, on the grid
    q = DSQQuantizer(bits, signed=True, alpha=alpha).double()
    primed(q, lower=lower, upper=upper)
    q.train()
    x = torch.linspace(lower - 0.3, upper + 0.3, 41, dtype=torch.float64, requires_grad=True)  # l, u sampled
    upstream = torch.randn(41, dtype=torch.float64)
    q(x).backward(upstream)

    lo = torch.tensor(lower, dtype=torch.float64, requires_grad=True)
    hi = torch.tensor(upper, dtype=torch.float64, requires_grad=True)
    al = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    _paper_q_s(x_ref, lo, hi, al, n).backward(upstream)

    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(q.lower.grad, lo.grad)
    torch.testing.assert_close(q.upper.grad, hi.grad)
    torch.testing.assert_close(q.alpha.grad, al.grad)


@pytest.mark.parametrize(
    ("signed", "role", "learned"),
    [(False, "act", ("upper", "alpha")), (True, "weight", ("upper", "alpha")), (True, "act", ("alpha",))],
    ids=["unsigned", "symmetric-weight", "asymmetric"],
)
def test_module_gradient_is_the_derivative_of_its_forward(primed, signed: bool, role: str, learned) -> None:
    """gradcheck: the soft forward's autograd equals its finite differences.

    For the asymmetric grid, ``l`` and ``u`` are left out: the forward rounds ``l`` to a multiple
    of ``delta`` (so 0 is a code), which is piecewise constant in ``l``, and their gradients are the
    paper's (continuous ``l``) by design, checked by the test above.
    """
    channels = 2 if role == "weight" else None
    q = DSQQuantizer(3, signed=signed, role=role, per_channel=channels is not None, channels=channels)
    q = q.double().train()
    values = {"upper": [2.5, 1.5] if channels else 2.5, "alpha": 0.2}
    if q.scheme == "asymmetric":
        values["lower"] = -1.0
    primed(q, **values)
    x = torch.tensor([-1.3, -0.71, -0.2, 0.33, 0.9, 1.45, 2.2, 3.0], dtype=torch.float64)
    if channels:
        x = torch.stack([x, -0.45 * x])

    def f(x_, *params):
        return torch.func.functional_call(q, dict(zip(learned, params, strict=True)), (x_,))

    params = [getattr(q, name).detach().clone().requires_grad_() for name in learned]
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params), eps=1e-7, atol=1e-5)


def test_hard_forward_soft_backward(primed) -> None:
    soft = primed(DSQQuantizer(2, signed=False, soft_forward=True), upper=3.0).train()
    hard = primed(DSQQuantizer(2, signed=False, soft_forward=False), upper=3.0).train()
    x1 = torch.tensor([0.3, 1.25, 2.9, 4.0], requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y_soft, y_hard = soft(x1), hard(x2)
    torch.testing.assert_close(y_hard, torch.tensor([0.0, 1.0, 3.0, 3.0]))
    y_soft.sum().backward()
    y_hard.sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(hard.upper.grad, soft.upper.grad)
    torch.testing.assert_close(hard.alpha.grad, soft.alpha.grad)


def test_init_from_data_and_alpha_range() -> None:
    q = DSQQuantizer(4, signed=True)
    q(torch.tensor([-0.5, 0.25, 3.0]))
    assert (q.lower.item(), q.upper.item(), q.alpha.item()) == (-0.5, 3.0, pytest.approx(0.2))
    w = DSQQuantizer(4, signed=True, per_channel=True, channels=2)
    w(torch.tensor([[-3.0, 1.0], [0.5, -0.25]]))
    torch.testing.assert_close(w.upper.detach(), torch.tensor([3.0, 0.5]))
    assert not hasattr(w, "lower")
    with pytest.raises(ValueError, match=r"alpha=0\.9"):
        DSQQuantizer(4, signed=False, alpha=0.9)


def test_qparams_asymmetric_zero_point(primed) -> None:
    q = primed(DSQQuantizer(2, signed=True), lower=-1.0, upper=2.0)
    qp = q.qparams()  # delta = 1, zp = round(-2 + 1) = -1
    assert (qp.scale.item(), qp.zero_point.item(), qp.qmin, qp.qmax) == (1.0, -1, -2, 1)
    x = torch.tensor([-5.0, -0.6, 0.4, 1.6, 9.0])
    torch.testing.assert_close(q.eval()(x), torch.tensor([-1.0, -1.0, 0.0, 2.0, 2.0]))
