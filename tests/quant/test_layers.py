"""Tests of fxfusion/quant/layers.py: the quantized twins of Conv1d, Conv2d and Linear.

``from_float`` must share the float layer's Parameters (an optimizer built on the float model
keeps training the quantized one) and ``to_float`` must give that float layer back, unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxfusion.quant import make_quantizer
from fxfusion.quant.layers import QUANT_LAYERS, QuantConv2d, QuantLinear, is_quantized, to_quantized

# name -> (float layer factory, input shape)
LAYERS = {
    "conv1d": (lambda bias: nn.Conv1d(3, 4, 3, padding=1, stride=2, bias=bias), (2, 3, 9)),
    "conv2d": (lambda bias: nn.Conv2d(3, 4, 3, padding=1, dilation=2, bias=bias), (2, 3, 7, 7)),
    "linear": (lambda bias: nn.Linear(5, 4, bias=bias), (2, 6, 5)),
}


def _quantizers(method: str = "lsq", act: bool = True) -> tuple[nn.Module, nn.Module | None]:
    wq = make_quantizer(method, bits=4, role="weight", signed=True, channels=4)
    aq = make_quantizer(method, bits=4, role="act", signed=True) if act else None
    return wq, aq


def _twin(name: str, bias: bool = True, act: bool = True):
    make, shape = LAYERS[name]
    layer = make(bias)
    wq, aq = _quantizers(act=act)
    cls = QUANT_LAYERS[type(layer)]
    return layer, cls.from_float(layer, wq, aq), torch.randn(shape)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_from_float_shares_parameters_and_attributes(name: str, bias: bool) -> None:
    layer, q, _ = _twin(name, bias)
    assert type(q) is QUANT_LAYERS[type(layer)] and isinstance(q, type(layer)) and is_quantized(q)
    assert q.weight is layer.weight and q.bias is layer.bias
    assert [n for n, _ in q.named_parameters() if "quant" not in n] == [n for n, _ in layer.named_parameters()]
    for key, value in vars(layer).items():
        if not key.startswith("_"):
            assert getattr(q, key) == value, key
    assert "weight_quant" in q._modules and "weight_quant" not in layer._modules  # the float layer stays as it was
    assert not is_quantized(layer)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_to_float_round_trip_keeps_identity_and_outputs(name: str, bias: bool) -> None:
    layer, q, x = _twin(name, bias)
    expected = layer(x)
    q.train()(x)  # initializes the quantizers; the float Parameters are not touched
    assert not torch.equal(q(x), expected)

    back = q.to_float()
    assert type(back) is type(layer) and not is_quantized(back)
    assert back.weight is layer.weight and back.bias is layer.bias
    assert list(back.children()) == []
    assert list(back.state_dict()) == list(layer.state_dict())
    assert torch.equal(back(x), expected)  # bit for bit: the float bias, not the int32-rounded one

    again = type(q).from_float(back, q.weight_quant, q.act_quant)
    assert again.weight is layer.weight and again.weight_quant is q.weight_quant
    assert torch.equal(again.eval()(x), q.eval()(x))


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_disabled_quantizers_give_the_float_output(name: str, act: bool) -> None:
    layer, q, x = _twin(name, act=act)
    q(x)  # initialized, so the bias would be rounded if the quantizers were on
    q.weight_quant.enabled = False
    if q.act_quant is not None:
        q.act_quant.enabled = False
    assert torch.equal(q(x), layer(x))


def test_the_bias_is_rounded_only_between_two_protocol_quantizers() -> None:
    layer, q, x = _twin("linear")
    q(x)
    aq, wq = q.act_quant, q.weight_quant
    step = aq.qparams().scale * wq.qparams().scale
    bias = torch.round(layer.bias / step) * step
    torch.testing.assert_close(q(x), F.linear(aq(x), wq(layer.weight), bias), rtol=0, atol=1e-6)
    # An input "quantizer" that is not one (no qparams grid): the bias stays in float.
    plain = QuantLinear.from_float(layer, wq, nn.Identity())
    assert torch.equal(plain(x), F.linear(x, wq(layer.weight), layer.bias))


def test_hooks_and_training_reach_the_shared_parameters() -> None:
    layer, q, x = _twin("conv2d")
    calls: list[str] = []
    layer.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    q(x)
    q.to_float()(x)
    assert calls == ["QuantConv2d", "Conv2d"]  # the hooks dict is shared, as to_quantized always did

    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    q(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(layer.weight, before)


def test_to_quantized_is_from_float() -> None:
    layer = nn.Conv2d(3, 4, 1)
    wq, aq = _quantizers()
    q = to_quantized(layer, wq, aq)
    assert type(q) is QuantConv2d and q.weight is layer.weight and q.act_quant is aq


def test_from_float_refuses_another_layer_type() -> None:
    wq, aq = _quantizers()
    with pytest.raises(TypeError, match="QuantConv2d.from_float expects a Conv2d, got Linear"):
        QuantConv2d.from_float(nn.Linear(4, 4), wq, aq)
    with pytest.raises(TypeError, match="got QuantConv2d"):
        QuantConv2d.from_float(QuantConv2d.from_float(nn.Conv2d(3, 4, 1), wq, aq), wq, aq)


def test_quantizer_children_are_saved_with_the_layer() -> None:
    layer, q, x = _twin("conv1d")
    q(x)
    state = q.state_dict()
    assert {"weight", "bias", "weight_quant.step", "act_quant.step"} <= set(state)
    fresh = QUANT_LAYERS[nn.Conv1d].from_float(nn.Conv1d(3, 4, 3, padding=1, stride=2), *_quantizers())
    fresh.load_state_dict(state)
    out: Tensor = fresh.eval()(x)
    assert torch.equal(out, q.eval()(x))
