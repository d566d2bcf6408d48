"""Tests of fxfusion/quant/pact.py against hand-computed values and the paper's STE."""

from __future__ import annotations

import pytest
import torch

from fxfusion.quant import PACTQuantizer


def test_forward_unsigned_by_hand(primed) -> None:
    q = primed(PACTQuantizer(2, signed=False), alpha=3.0)  # scale 3 / 3 = 1
    x = torch.tensor([-1.0, 0.4, 0.5, 1.5, 2.6, 7.0])
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 0.0, 2.0, 3.0, 3.0]))
    qp = q.qparams()
    assert (qp.scale.item(), qp.zero_point.item(), qp.qmin, qp.qmax) == (1.0, 0, 0, 3)


def test_forward_signed_with_integer_zero_point_by_hand(primed) -> None:
    q = primed(PACTQuantizer(2, signed=True), alpha=2.0, beta=-1.0)
    # scale = (2 - (-1)) / 3 = 1, zero point = round(-2 - (-1) / 1) = -1: grid {-1, 0, 1, 2}
    qp = q.qparams()
    assert (qp.scale.item(), qp.zero_point.item(), qp.qmin, qp.qmax) == (1.0, -1, -2, 1)
    x = torch.tensor([-3.0, -0.4, 0.7, 1.5, 9.0])
    torch.testing.assert_close(q(x), torch.tensor([-1.0, 0.0, 1.0, 2.0, 2.0]))


def test_init_from_data_or_constant() -> None:
    q = PACTQuantizer(4, signed=True)
    q(torch.tensor([-0.5, 0.1, 3.0]))
    assert (q.alpha.item(), q.beta.item()) == (3.0, -0.5)
    q = PACTQuantizer(4, signed=False, init_alpha=6.0)
    q(torch.tensor([0.1, 3.0]))
    assert q.alpha.item() == 6.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_unsigned_gradients_are_the_paper_ste(primed, bits: int) -> None:
    alpha = 2.0
    q = primed(PACTQuantizer(bits, signed=False), alpha=alpha)
    x = torch.tensor([-1.0, 0.3, 1.2, 1.99, 2.0, 2.5, 9.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    q(x).backward(upstream)
    # dy/dx = 1 on (0, alpha); dy/dalpha = 1 where x >= alpha.
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(q.alpha.grad, torch.tensor(5.0 + 6.0 + 7.0))


def test_signed_gradients_reach_both_clips(primed) -> None:
    q = primed(PACTQuantizer(3, signed=True), alpha=1.0, beta=-0.5)
    x = torch.tensor([-2.0, -0.5, -0.2, 0.4, 1.0, 3.0], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    q(x).backward(upstream)
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 3.0, 4.0, 0.0, 0.0]))
    torch.testing.assert_close(q.alpha.grad, torch.tensor(11.0))
    torch.testing.assert_close(q.beta.grad, torch.tensor(3.0))


def test_regularizer_is_l2_on_the_clips(primed) -> None:
    q = primed(PACTQuantizer(4, signed=False), alpha=3.0)
    reg = q.regularizer()
    assert reg.item() == 9.0
    reg.backward()
    assert q.alpha.grad.item() == 6.0
    q = primed(PACTQuantizer(4, signed=True), alpha=3.0, beta=-2.0)
    assert q.regularizer().item() == 13.0
    w = PACTQuantizer(4, signed=True, per_channel=True, channels=2)
    assert w.regularizer().item() == 0.0


def test_weights_use_per_channel_max_abs() -> None:
    q = PACTQuantizer(2, signed=True, per_channel=True, channels=2)  # codes -1..1
    w = torch.tensor([[0.2, -0.6, 0.35], [4.0, -1.0, 2.5]], requires_grad=True)
    y = q(w)
    qp = q.qparams()
    torch.testing.assert_close(qp.scale, torch.tensor([0.6, 4.0]))
    # w/s = [0.33, -1, 0.58], [1, -0.25, 0.625] -> [0, -1, 1], [1, 0, 1]
    torch.testing.assert_close(y, torch.tensor([[0.0, -0.6, 0.6], [4.0, 0.0, 4.0]]))
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))
    assert not list(q.parameters())


def test_weight_range_follows_the_weights_in_training_only() -> None:
    q = PACTQuantizer(4, signed=True, per_channel=True, channels=1)
    q(torch.tensor([[1.0, -7.0]]))
    q(torch.tensor([[1.0, -14.0]]))
    assert q.qparams().scale.item() == 2.0  # the current weights, no averaging
    q.eval()(torch.tensor([[70.0]]))
    assert q.qparams().scale.item() == 2.0
