"""Tests of fxfusion/quant/minmax.py: running range, hand-computed grids, STE gradient."""

from __future__ import annotations

import pytest
import torch

from fxfusion.quant import MinMaxQuantizer


def test_unsigned_forward_by_hand() -> None:
    q = MinMaxQuantizer(2, signed=False)
    x = torch.tensor([0.0, 0.4, 0.5, 1.6, 3.0])  # range [0, 3] -> scale 1
    torch.testing.assert_close(q(x), torch.tensor([0.0, 0.0, 0.0, 2.0, 3.0]))
    qp = q.qparams()
    assert (qp.scale.item(), qp.zero_point.item()) == (1.0, 0)


def test_signed_activation_is_asymmetric_by_hand() -> None:
    q = MinMaxQuantizer(2, signed=True)  # codes -2..1
    x = torch.tensor([-1.0, -0.4, 0.6, 2.0])  # scale (2 + 1) / 3 = 1, zp = round(-2 + 1) = -1
    torch.testing.assert_close(q(x), torch.tensor([-1.0, -0.0, 1.0, 2.0]))
    qp = q.qparams()
    assert (qp.scale.item(), qp.zero_point.item(), qp.qmin, qp.qmax) == (1.0, -1, -2, 1)


def test_range_is_widened_to_contain_zero() -> None:
    q = MinMaxQuantizer(8, signed=True)
    q(torch.tensor([1.0, 2.0, 3.0]))
    qp = q.qparams()
    assert qp.zero_point.item() == -128  # lower end of the grid is exactly 0
    torch.testing.assert_close(qp.scale, torch.tensor(3.0 / 255))


def test_ema_by_hand() -> None:
    q = MinMaxQuantizer(8, signed=True)
    q(torch.tensor([-1.0, 2.0]))  # first batch sets the range
    assert (q.running_min.item(), q.running_max.item()) == (-1.0, 2.0)
    q(torch.tensor([-3.0, 12.0]))  # r <- 0.9 r + 0.1 batch
    torch.testing.assert_close(q.running_min, torch.tensor(-1.2))
    torch.testing.assert_close(q.running_max, torch.tensor(3.0))
    q.eval()(torch.tensor([-100.0, 100.0]))  # eval does not update
    torch.testing.assert_close(q.running_max, torch.tensor(3.0))


def test_weights_track_the_current_range_per_channel() -> None:
    q = MinMaxQuantizer(4, signed=True, per_channel=True, channels=2)  # codes -7..7
    q(torch.tensor([[1.0, -7.0], [0.5, 0.25]]))
    q(torch.tensor([[1.0, -14.0], [0.5, 0.7]]))
    assert q.momentum == 1.0
    torch.testing.assert_close(q.qparams().scale, torch.tensor([2.0, 0.1]))


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_gradient_is_clipped_straight_through(bits: int) -> None:
    q = MinMaxQuantizer(bits, signed=False)
    q(torch.tensor([0.0, 1.0]))  # scale 1 / (2^b - 1)
    q.eval()
    scale = 1.0 / (2**bits - 1)
    x = torch.tensor([-1.0, -0.4 * scale, 0.3, 0.99, 1.0 + 0.4 * scale, 1.5], requires_grad=True)
    upstream = torch.arange(1.0, 7.0)
    q(x).backward(upstream)
    # 1 where the rounded code is inside [0, 2^b - 1]: -0.4 s and 1 + 0.4 s round back inside.
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0]))


def test_bad_momentum() -> None:
    with pytest.raises(ValueError, match="momentum=0"):
        MinMaxQuantizer(8, signed=False, momentum=0)
