"""The contract every built-in quantizer keeps, parametrized over methods, roles and bits.

- forward equals ONNX QuantizeLinear/DequantizeLinear computed from ``qparams()`` (the parity
  the exporter relies on), for the uniform quantizers; N2UQ activations equal the threshold
  staircase of ``qparams().thresholds``;
- outputs lie on the grid;
- ``state_dict`` carries the initialization; ``enabled=False`` is the identity;
- any input shape, per channel along any axis.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from fxfusion.quant import QUANTIZERS, QParams, make_quantizer

METHODS = sorted(QUANTIZERS)
BITS = range(2, 9)
# (role, signed, channels): signed per-channel weights, unsigned and signed activations.
CONFIGS = [("weight", True, 6), ("act", False, None), ("act", True, None)]
CONFIG_IDS = ["weight", "act-unsigned", "act-signed"]


def _data(signed: bool, shape: tuple[int, ...] = (6, 4, 5, 5)) -> Tensor:
    x = torch.randn(shape) * 1.5
    # SiLU-like: mostly positive with a small negative tail, so asymmetric grids are exercised.
    return x if signed else torch.relu(x)


def _onnx_qdq(x: Tensor, qp: QParams) -> Tensor:
    """ONNX QuantizeLinear + DequantizeLinear (round half to even, saturate), written out."""
    scale, zero_point = qp.scale, qp.zero_point.to(x.dtype)
    if qp.per_channel:
        shape = [1] * x.dim()
        shape[qp.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    code = torch.clamp(torch.round(x / scale) + zero_point, qp.qmin, qp.qmax)
    return (code - zero_point) * scale


def _staircase(x: Tensor, qp: QParams) -> Tensor:
    """N2UQ deployment: code = qmin + #{t < x}, then DequantizeLinear."""
    code = qp.qmin + (x.unsqueeze(-1) > qp.thresholds).sum(-1).to(x.dtype)
    return (code - qp.zero_point.to(x.dtype)) * qp.scale


def _is_uniform(method: str, role: str) -> bool:
    return not (method == "n2uq" and role == "act")


def _trained(method: str, bits: int, role: str, signed: bool, channels: int | None):
    q = make_quantizer(method, bits=bits, role=role, signed=signed, channels=channels)
    q.train()
    x = _data(signed).requires_grad_()
    q(x).sum().backward()  # initializes and exercises the backward once
    return q


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("role", "signed", "channels"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_eval_forward_equals_onnx_qdq_of_qparams(
    method: str, bits: int, role: str, signed: bool, channels: int | None
) -> None:
    q = _trained(method, bits, role, signed, channels).eval()
    x = _data(signed) * 1.3  # new data, partly outside the calibrated range
    y = q(x)
    qp = q.qparams()
    assert qp.bits == bits and (qp.qmin, qp.qmax) == (q.qmin, q.qmax)
    assert qp.scale.shape == ((channels,) if channels else ())
    assert qp.zero_point.dtype == torch.int64 and qp.zero_point.shape == qp.scale.shape
    assert bool((qp.scale > 0).all())
    assert bool(((qp.zero_point >= qp.qmin) & (qp.zero_point <= qp.qmax)).all())
    if _is_uniform(method, role):
        assert qp.thresholds is None
        torch.testing.assert_close(y, _onnx_qdq(x, qp), rtol=0, atol=1e-6)
    else:
        assert qp.thresholds.shape == (2**bits - 1,)
        assert bool((qp.thresholds.diff() > 0).all())
        torch.testing.assert_close(y, _staircase(x, qp), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("role", "signed", "channels"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_train_forward_is_on_the_grid(
    method: str, bits: int, role: str, signed: bool, channels: int | None
) -> None:
    options = {"soft_forward": False} if method == "dsq" else {}
    q = make_quantizer(method, bits=bits, role=role, signed=signed, channels=channels, **options)
    y = q.train()(_data(signed) * 1.3)
    qp = q.qparams()
    if not _is_uniform(method, role):
        assert bool(torch.isin(y, qp.levels).all())
        assert qp.levels.shape == (2**bits,)
        return
    # Hard training forwards (LSQ, PACT, min/max, N2UQ weights, DSQ hard) also equal the QDQ.
    torch.testing.assert_close(y, _onnx_qdq(y, qp), rtol=0, atol=1e-6)
    scale = qp.scale.reshape(-1, 1, 1, 1) if qp.per_channel else qp.scale
    code = y / scale + qp.zero_point.reshape(scale.shape)
    torch.testing.assert_close(code, torch.round(code), rtol=0, atol=1e-4)
    assert code.min() >= qp.qmin - 1e-4 and code.max() <= qp.qmax + 1e-4


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_dsq_soft_training_forward_stays_within_the_grid_range(bits: int, signed: bool) -> None:
    q = make_quantizer("dsq", bits=bits, role="act", signed=signed).train()
    x = _data(signed) * 1.3
    y = q(x)
    qp = q.qparams()
    low = (qp.qmin - qp.zero_point) * qp.scale
    high = (qp.qmax - qp.zero_point) * qp.scale
    assert y.min() >= low - 1e-5 and y.max() <= high + 1e-5
    # Soft values are not on the grid, but rounding them gives the hard (eval) value almost
    # everywhere: Q_S is monotone and crosses each midpoint with phi = 0.
    torch.testing.assert_close(_onnx_qdq(y, qp), q.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("role", "signed", "channels"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_keeps_initialization(
    method: str, role: str, signed: bool, channels: int | None
) -> None:
    trained = _trained(method, 4, role, signed, channels)
    fresh = make_quantizer(method, bits=4, role=role, signed=signed, channels=channels)
    assert not bool(fresh.initialized)
    state = trained.state_dict()
    assert "initialized" in state and bool(state["initialized"])
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    x = _data(signed)
    torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)
    for field in ("scale", "zero_point"):
        torch.testing.assert_close(getattr(fresh.qparams(), field), getattr(trained.qparams(), field))


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_of_an_uninitialized_quantizer(method: str) -> None:
    source = make_quantizer(method, bits=4, role="act", signed=False)
    target = make_quantizer(method, bits=4, role="act", signed=False)
    with torch.no_grad():
        target.initialized.fill_(True)
    target.load_state_dict(source.state_dict())
    assert not bool(target.initialized)
    with pytest.raises(RuntimeError, match="not initialized"):
        target.qparams()
    target(_data(False))
    assert bool(target.initialized)


@pytest.mark.parametrize(("role", "signed", "channels"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_disabled_quantizer_is_identity(method: str, role: str, signed: bool, channels: int | None) -> None:
    q = make_quantizer(method, bits=2, role=role, signed=signed, channels=channels)
    q.enabled = False
    x = _data(signed).requires_grad_()
    y = q(x)
    assert y is x
    assert not bool(q.initialized)  # a disabled quantizer does not calibrate either
    q.enabled = True
    assert not torch.equal(q(x), x)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4, 5), (1, 2, 3, 2, 2)])
def test_per_tensor_any_shape(method: str, shape: tuple[int, ...]) -> None:
    q = make_quantizer(method, bits=3, role="act", signed=True)
    x = torch.randn(shape, requires_grad=True)
    y = q(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_passes_through_without_calibrating(method: str) -> None:
    q = make_quantizer(method, bits=4, role="act", signed=True)
    x = torch.zeros(0, 3)
    assert q(x) is x and not bool(q.initialized)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("shape", "axis"), [((4, 3), 0), ((2, 4, 3), 1), ((2, 3, 4), -1), ((4,), 0)])
def test_per_channel_along_any_axis(method: str, shape: tuple[int, ...], axis: int) -> None:
    q = make_quantizer(method, bits=4, role="weight", signed=True, channels=4, axis=axis)
    x = (torch.rand(shape) + 1) * torch.sign(torch.randn(shape))
    # Channel c is scaled by 10^c: a per-channel scale must follow it.
    gains = 10.0 ** torch.arange(4.0)
    view = [1] * x.dim()
    view[axis] = 4
    x = x * gains.reshape(view)
    q(x)  # initializes in training mode
    y = q.eval()(x)
    qp = q.qparams()
    assert qp.axis == axis and qp.scale.shape == (4,)
    ratios = qp.scale[1:] / qp.scale[:-1]
    assert bool((ratios > 2).all()), ratios
    torch.testing.assert_close(y, _onnx_qdq(x, qp), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_per_channel_mismatch_names_the_sizes(method: str) -> None:
    q = make_quantizer(method, bits=4, role="weight", signed=True, channels=8)
    with pytest.raises(ValueError, match=r"5 channels on axis 0.*channels=8"):
        q(torch.randn(5, 3))
    with pytest.raises(TypeError, match="floating-point"):
        q(torch.ones(8, 3, dtype=torch.int64))


@pytest.mark.parametrize("method", METHODS)
def test_qparams_before_any_forward_raises(method: str) -> None:
    q = make_quantizer(method, bits=4, role="act", signed=False)
    with pytest.raises(RuntimeError, match="run one forward pass"):
        q.qparams()


@pytest.mark.parametrize("method", METHODS)
def test_eval_forward_changes_no_state(method: str) -> None:
    q = _trained(method, 4, "act", True, None).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(_data(True) * 10)
    for key, value in q.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize(("role", "signed", "channels"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_output_keeps_the_input_dtype(method: str, role: str, signed: bool, channels: int | None) -> None:
    q = make_quantizer(method, bits=4, role=role, signed=signed, channels=channels)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = _data(signed).to(dtype).requires_grad_()
        y = q(x)
        y.float().sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype


@pytest.mark.parametrize("method", METHODS)
def test_reset_makes_the_next_forward_initialize_again(method: str) -> None:
    q = make_quantizer(method, bits=4, role="act", signed=False)
    q(torch.rand(64))  # range from [0, 1)
    first = q.qparams().scale.clone()
    q.reset()
    assert not q.ready
    q(10 * torch.rand(64))  # range from [0, 10)
    assert q.ready and bool(q.initialized)
    assert float(q.qparams().scale.max()) > 2 * float(first.max())
