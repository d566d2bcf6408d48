"""Tests of fxfusion/quant/base.py and the factory in fxfusion/quant/__init__.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from fxfusion.quant import (
    QUANTIZERS,
    DSQQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    N2UQQuantizer,
    PACTQuantizer,
    QParams,
    Quantizer,
    QuantizerProtocol,
    check_bits,
    fake_quantize,
    grad_scale,
    is_quantizer,
    make_quantizer,
    qrange,
    range_tensors,
    round_ste,
)
from fxfusion.quant.base import DEFAULT_RANGE_NAMES

METHODS = sorted(QUANTIZERS)


# --------------------------------------------------------------------------- bits and ranges


@pytest.mark.parametrize("bits", range(2, 9))
def test_check_bits_accepts_2_to_8(bits: int) -> None:
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bits", [-3, 0, 1, 9, 16])
def test_check_bits_rejects_out_of_range_naming_the_value(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"bits={bits}\b.*2\.\.8"):
        check_bits(bits)


@pytest.mark.parametrize("bits", [4.0, "4", True, None])
def test_check_bits_rejects_non_int(bits: object) -> None:
    with pytest.raises(TypeError, match="bits must be an int"):
        check_bits(bits)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [1, 9, 32])
def test_every_quantizer_rejects_bad_bits(method: str, bits: int) -> None:
    with pytest.raises(ValueError, match=str(bits)):
        make_quantizer(method, bits=bits, role="act", signed=False)
    with pytest.raises(ValueError, match=str(bits)):
        QUANTIZERS[method](bits, signed=True)


def test_qrange_by_hand() -> None:
    assert qrange(2, False) == (0, 3)
    assert qrange(2, True) == (-2, 1)
    assert qrange(2, True, restricted=True) == (-1, 1)
    assert qrange(4, False) == (0, 15)
    assert qrange(4, True) == (-8, 7)
    assert qrange(4, True, restricted=True) == (-7, 7)
    assert qrange(8, False) == (0, 255)
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, True, restricted=True) == (-127, 127)


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_ranges_are_symmetric(bits: int) -> None:
    for method in METHODS:
        q = make_quantizer(method, bits=bits, role="weight", signed=True, channels=3)
        assert q.qmin == -q.qmax == -(2 ** (bits - 1) - 1)


# --------------------------------------------------------------------------- STE helpers


def test_round_ste_rounds_half_to_even_with_identity_gradient() -> None:
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51], requires_grad=True)
    y = round_ste(x)
    torch.testing.assert_close(y, torch.tensor([-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 0.0, 1.0]))
    y.backward(torch.arange(8.0))
    torch.testing.assert_close(x.grad, torch.arange(8.0))


def test_grad_scale_keeps_value_scales_gradient() -> None:
    s = torch.tensor([2.0, 3.0], requires_grad=True)
    y = grad_scale(s, 0.25)
    torch.testing.assert_close(y, torch.tensor([2.0, 3.0]))
    (y * torch.tensor([1.0, 4.0])).sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor([0.25, 1.0]))


def test_fake_quantize_matches_onnx_formula_by_hand() -> None:
    # scale 0.5, zero point 1, codes in [0, 3]: grid {-0.5, 0, 0.5, 1}.
    x = torch.tensor([-4.0, -0.25, 0.25, 0.74, 0.75, 5.0])
    y = fake_quantize(x, torch.tensor(0.5), torch.tensor(1), 0, 3)
    # x/s = -8, -0.5, 0.5, 1.48, 1.5, 10 -> rint -8, -0, 0, 1, 2, 10 -> +1 clamp 0, 1, 1, 2, 3, 3
    torch.testing.assert_close(y, torch.tensor([-0.5, 0.0, 0.0, 0.5, 1.0, 1.0]))


def test_fake_quantize_per_channel_axis() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    y = fake_quantize(x, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), -1, 1, axis=0)
    torch.testing.assert_close(y, torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0]]))


# --------------------------------------------------------------------------- QParams


def test_qparams_is_frozen_and_validated() -> None:
    qp = QParams(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), -7, 7, 0, 4)
    assert qp.per_channel and qp.thresholds is None and qp.levels is None
    with pytest.raises(AttributeError):
        qp.bits = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="zero_point must be int64"):
        QParams(torch.tensor(0.1), torch.tensor(0.0), 0, 15, None, 4)
    with pytest.raises(ValueError, match="differ"):
        QParams(torch.tensor([0.1, 0.2]), torch.tensor(0), 0, 15, 0, 4)
    with pytest.raises(ValueError, match="needs an axis"):
        QParams(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 0, 15, None, 4)


# --------------------------------------------------------------------------- protocol


class _UserQuantizer(nn.Module):
    """A third-party quantizer: not a fxfusion subclass, only the protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.bits, self.signed, self.per_channel, self.axis, self.enabled = 8, False, False, None, True

    def forward(self, x: Tensor) -> Tensor:
        return x

    def qparams(self) -> QParams:
        return QParams(torch.tensor(1.0), torch.tensor(0), 0, 255, None, 8)


def test_protocol_accepts_builtins_and_user_modules() -> None:
    for method in METHODS:
        assert isinstance(make_quantizer(method, bits=4, role="act", signed=False), QuantizerProtocol)
    assert isinstance(_UserQuantizer(), QuantizerProtocol)
    assert not isinstance(nn.ReLU(), QuantizerProtocol)


def test_is_quantizer_needs_the_whole_protocol_on_a_module() -> None:
    for method in METHODS:
        assert is_quantizer(make_quantizer(method, bits=4, role="weight", signed=True, channels=2))
    assert is_quantizer(_UserQuantizer())
    assert not is_quantizer(nn.ReLU())
    assert not is_quantizer(None)
    # Every attribute is there, but it is no module: it cannot sit in a model.
    user = _UserQuantizer()
    lookalike = SimpleNamespace(**{k: getattr(user, k) for k in ("bits", "signed", "per_channel", "axis", "enabled")},
                                forward=user.forward, qparams=user.qparams)
    assert isinstance(lookalike, QuantizerProtocol) and not is_quantizer(lookalike)
    # A module with qparams() but no bits (the old hasattr test accepted it) is not a quantizer.
    partial = _UserQuantizer()
    del partial.bits
    assert not is_quantizer(partial)


# --------------------------------------------------------------------------- range tensors


# (role, signed, channels) -> the range tensors each method has in that configuration.
_RANGES = {
    "lsq": {"weight": ["step"], "act-unsigned": ["step"], "act-signed": ["step"]},
    "pact": {"weight": ["running_min", "running_max"], "act-unsigned": ["alpha"], "act-signed": ["alpha", "beta"]},
    "dsq": {"weight": ["upper"], "act-unsigned": ["upper"], "act-signed": ["upper", "lower"]},
    "n2uq": {"weight": ["step"], "act-unsigned": ["start", "widths", "step"],
             "act-signed": ["start", "widths", "step"]},
    "minmax": {"weight": ["running_min", "running_max"], "act-unsigned": ["running_min", "running_max"],
               "act-signed": ["running_min", "running_max"]},
}
_CONFIGS = {"weight": ("weight", True, 3), "act-unsigned": ("act", False, None), "act-signed": ("act", True, None)}


@pytest.mark.parametrize("config", sorted(_CONFIGS))
@pytest.mark.parametrize("method", METHODS)
def test_range_tensors_are_the_named_tensors_themselves(method: str, config: str) -> None:
    role, signed, channels = _CONFIGS[config]
    q = make_quantizer(method, bits=4, role=role, signed=signed, channels=channels)
    assert "range_names" in type(q).__dict__, "each method declares its own range_names"
    tensors, names = range_tensors(q), _RANGES[method][config]
    assert len(tensors) == len(names) and all(t is getattr(q, n) for t, n in zip(tensors, names))


@pytest.mark.parametrize("config", sorted(_CONFIGS))
@pytest.mark.parametrize("method", METHODS)
def test_scaling_the_range_tensors_stretches_the_grid(method: str, config: str) -> None:
    role, signed, channels = _CONFIGS[config]
    q = make_quantizer(method, bits=4, role=role, signed=signed, channels=channels)
    q(torch.randn(3, 8) if signed else torch.rand(3, 8))
    q.eval()
    before = q.qparams()
    with torch.no_grad():
        for t in range_tensors(q):
            t.mul_(2.0)
    after = q.qparams()
    torch.testing.assert_close(after.scale, 2 * before.scale)
    torch.testing.assert_close(after.zero_point, before.zero_point)
    if before.thresholds is not None:
        torch.testing.assert_close(after.thresholds, 2 * before.thresholds)


def test_range_tensors_of_a_foreign_quantizer_use_the_default_names() -> None:
    q = _UserQuantizer()
    q.register_buffer("step", torch.tensor(0.5))
    q.upper = 3.0  # not a tensor: skipped
    assert "step" in DEFAULT_RANGE_NAMES and "upper" in DEFAULT_RANGE_NAMES
    assert [t is q.step for t in range_tensors(q)] == [True]
    q.range_names = ()
    assert range_tensors(q) == []


# --------------------------------------------------------------------------- subclassing


class _Clip(Quantizer):
    """A minimal subclass: the class attributes and the _make_params hook, no __init__."""

    signed_act_scheme = "asymmetric"
    range_names = ("hi",)

    def _make_params(self) -> None:
        self.hi = nn.Parameter(torch.ones(self.param_shape))


def test_subclass_configures_through_class_attributes_and_the_hook() -> None:
    q = _Clip(4, signed=True, per_channel=True, channels=3, role="act")
    assert q.scheme == "asymmetric" and q.hi.shape == (3,)
    assert [t is q.hi for t in range_tensors(q)] == [True]
    assert _Clip(4, signed=True, role="weight", per_channel=True, channels=2).scheme == "symmetric"
    # The keyword still overrides the class attribute (subclasses written against the old base).
    assert _Clip(4, signed=True, signed_act_scheme="symmetric").scheme == "symmetric"
    with pytest.raises(ValueError, match="signed_act_scheme='affine'"):
        _Clip(4, signed=True, signed_act_scheme="affine")


@pytest.mark.parametrize("method", METHODS)
def test_signed_activation_scheme_per_method(method: str) -> None:
    expected = "symmetric" if method in ("lsq", "n2uq") else "asymmetric"
    assert QUANTIZERS[method].signed_act_scheme == expected
    assert make_quantizer(method, bits=4, role="act", signed=True).scheme == expected


def test_constructor_options_stay_keywords_of_their_class() -> None:
    pact = PACTQuantizer(4, signed=True, init_alpha=2.0)
    assert (pact.alpha.item(), pact.beta.item(), pact.init_alpha) == (2.0, -2.0, 2.0)
    weight = PACTQuantizer(4, signed=True, role="weight", per_channel=True, channels=2, init_alpha=2.0)
    assert weight.running_max.shape == (2,) and not hasattr(weight, "alpha")
    dsq = DSQQuantizer(3, signed=False, alpha=0.3, soft_forward=False)
    assert (round(dsq.alpha.item(), 6), dsq.soft_forward) == (0.3, False)
    assert [n for n, _ in DSQQuantizer(3, signed=True).named_parameters()] == ["upper", "lower", "alpha"]
    assert MinMaxQuantizer(8, signed=False, momentum=0.5).momentum == 0.5
    for cls, option in ((LSQQuantizer, "init_alpha"), (DSQQuantizer, "momentum"), (N2UQQuantizer, "alpha")):
        with pytest.raises(TypeError, match=option):
            cls(4, signed=False, **{option: 1.0})
    with pytest.raises(ValueError, match="init_alpha=-1"):
        PACTQuantizer(4, signed=False, init_alpha=-1.0)


# --------------------------------------------------------------------------- factory


def test_factory_dict_names() -> None:
    assert QUANTIZERS == {
        "lsq": LSQQuantizer,
        "pact": PACTQuantizer,
        "dsq": DSQQuantizer,
        "n2uq": N2UQQuantizer,
        "minmax": MinMaxQuantizer,
    }


@pytest.mark.parametrize("method", METHODS)
def test_make_quantizer_builds_the_configuration(method: str) -> None:
    w = make_quantizer(method, bits=3, role="weight", signed=True, channels=5)
    assert type(w) is QUANTIZERS[method]
    assert (w.bits, w.signed, w.role, w.per_channel, w.channels, w.axis) == (3, True, "weight", True, 5, 0)
    a = make_quantizer(method.upper(), bits=6, role="act", signed=False)
    assert (a.bits, a.signed, a.role, a.per_channel, a.axis, a.enabled) == (6, False, "act", False, None, True)
    assert (a.qmin, a.qmax) == (0, 63)


def test_make_quantizer_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'apot'.*dsq, lsq, minmax, n2uq, pact"):
        make_quantizer("apot", bits=4, role="act", signed=False)


def test_make_quantizer_rejects_bad_role_and_lonely_axis() -> None:
    with pytest.raises(ValueError, match="role='bias'"):
        make_quantizer("lsq", bits=4, role="bias", signed=False)
    with pytest.raises(ValueError, match="axis=1 needs channels"):
        make_quantizer("lsq", bits=4, role="weight", signed=True, axis=1)


def test_make_quantizer_passes_method_options() -> None:
    q = make_quantizer("pact", bits=4, role="act", signed=False, init_alpha=6.0)
    assert q.alpha.item() == 6.0
    with pytest.raises(TypeError):
        make_quantizer("lsq", bits=4, role="act", signed=False, init_alpha=6.0)


def test_constructor_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="channels=<positive int>"):
        LSQQuantizer(4, signed=True, per_channel=True)
    with pytest.raises(ValueError, match="only to per-channel"):
        LSQQuantizer(4, signed=True, channels=3)
    with pytest.raises(TypeError, match="signed must be a bool"):
        LSQQuantizer(4, signed=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per tensor"):
        N2UQQuantizer(4, signed=False, role="act", per_channel=True, channels=3)


def test_role_defaults_follow_per_channel() -> None:
    assert LSQQuantizer(4, signed=True, per_channel=True, channels=2).role == "weight"
    assert LSQQuantizer(4, signed=True).role == "act"
