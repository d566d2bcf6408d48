"""torch.ao.quantization interop: its fake-quantize modules through our protocol, and its own flow.

1. :class:`AOFakeQuantizer` wraps ``FakeQuantize`` and ``_LearnableFakeQuantize``: the protocol
   attributes come from the module's range and qscheme, ``qparams()`` is its own
   ``calculate_qparams()`` (equal to the scale and zero point its forward used), ``forward`` is its
   forward, and ``ao_factory`` plugs both into ``fxfusion.quantize``.

2. A *rewritten* model goes through ``torch.ao.quantization.quantize_fx.prepare_qat_fx``. What it
   needs: GABFusion declared a leaf with
   ``PrepareCustomConfig().set_non_traceable_module_classes([GABFusion])``.

   - Without it, prepare_qat_fx also works on the rewritten ResNet: it traces *through* GABFusion.
     But then the x86 qconfig mapping puts 8-bit fake quantizers on the ``exp(log α)`` scalars, on
     every ``α_i · x_i`` product, and on the LayerNorm's mean, variance and ``rsqrt`` (measured:
     ~10 extra fake quantizers per site, prepare time 2.0 s instead of 0.2 s). Quantizing
     ``rsqrt(var + eps)`` is numerically wrong for training, and none of these tensors exists
     after ``fxfusion.deploy`` folds α and the LayerNorm.
   - As a leaf, GABFusion stays one ``call_module`` node running in float; prepare_qat_fx
     observes its inputs and output like any other float op, fuses conv-bn(-relu) around it as
     usual, and α still learns (autograd goes through the leaf).
   - Whole-model ``symbolic_trace`` still fails on models that fail it without fxfusion (e.g. the
     YOLO zoo models: "Proxy object cannot be iterated"); that is torch.ao's limit, not the
     rewrite's, and is why ``fxfusion.quantize`` traces per unit.

Both parts skip when ``torch.ao.quantization`` is absent (it is deprecated upstream).
"""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ao = pytest.importorskip("torch.ao.quantization")

import fxfusion  # noqa: E402
from fxfusion.gabfusion import GABFusion, set_gate  # noqa: E402
from fxfusion.quant import QParams, QuantizerProtocol, is_quantizer, range_tensors  # noqa: E402
from fxfusion.quant.ao import AOFakeQuantizer, ao_factory  # noqa: E402
from fxfusion.quant.layers import is_quantized  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.ao.quantization is deprecated:DeprecationWarning",
    "ignore:Please use quant_min and quant_max:UserWarning",
    "ignore::FutureWarning",
)

FakeQuantize = ao.FakeQuantize
LearnableFQ = pytest.importorskip("torch.ao.quantization._learnable_fake_quantize")._LearnableFakeQuantize
PerTensor = ao.MovingAverageMinMaxObserver
PerChannel = ao.MovingAveragePerChannelMinMaxObserver

# (kind, signed, per_channel) -> module at 4 bits, with fxfusion's ranges
_CASES = [("weight", True, True), ("act", False, False), ("act", True, False)]
_IDS = ["weight-per-channel", "act-unsigned", "act-signed"]


def _fake_quantize(signed: bool, per_channel: bool, learnable: bool = False) -> nn.Module:
    qmin, qmax = ((-7, 7) if per_channel else (-8, 7)) if signed else (0, 15)
    dtype = torch.qint8 if signed else torch.quint8
    if per_channel:
        kwargs = dict(observer=PerChannel, qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        kwargs = dict(observer=PerTensor, qscheme=torch.per_tensor_affine)
    if learnable:
        if per_channel:
            kwargs["channel_len"] = 6
        return LearnableFQ(quant_min=qmin, quant_max=qmax, dtype=dtype, use_grad_scaling=True, **kwargs)
    return FakeQuantize(quant_min=qmin, quant_max=qmax, dtype=dtype, **kwargs)


def _data(signed: bool, per_channel: bool, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((6, 4, 3, 3) if per_channel else (2, 6, 5, 5), generator=g)
    return x if signed else torch.relu(x)


def _onnx_qdq(x: Tensor, qp: QParams) -> Tensor:
    scale, zp = qp.scale, qp.zero_point.to(x.dtype)
    if qp.per_channel:
        shape = [-1 if d == qp.axis else 1 for d in range(x.dim())]
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (torch.clamp(torch.round(x / scale) + zp, qp.qmin, qp.qmax) - zp) * scale


# --------------------------------------------------------------------------- the adapter


@pytest.mark.parametrize("learnable", [False, True], ids=["FakeQuantize", "_LearnableFakeQuantize"])
def test_adapter_is_a_quantizer_without_range_tensors(learnable):
    # Its scale lives in the wrapped module and the observer recomputes it: nothing to rescale.
    q = AOFakeQuantizer(_fake_quantize(True, True, learnable))
    assert is_quantizer(q) and not is_quantizer(q.fake_quant)
    assert q.range_names == () and range_tensors(q) == []


@pytest.mark.parametrize("learnable", [False, True], ids=["FakeQuantize", "_LearnableFakeQuantize"])
@pytest.mark.parametrize(("kind", "signed", "per_channel"), _CASES, ids=_IDS)
def test_adapter_follows_the_module(kind, signed, per_channel, learnable):
    torch.manual_seed(0)
    fq = _fake_quantize(signed, per_channel, learnable)
    twin = copy.deepcopy(fq)
    q = AOFakeQuantizer(fq)
    assert isinstance(q, QuantizerProtocol)
    assert (q.bits, q.signed, q.per_channel, q.axis, q.enabled) == (4, signed, per_channel,
                                                                      0 if per_channel else None, True)

    x = _data(signed, per_channel)
    y = q(x)
    assert torch.equal(y, twin(x)), "forward must be the module's forward"

    qp = q.qparams()
    scale, zero_point = fq.calculate_qparams()
    own_scale, own_zp = fq.scale.detach(), fq.zero_point.detach()  # what its forward used
    assert (qp.qmin, qp.qmax, qp.bits) == (fq.quant_min, fq.quant_max, 4)
    assert qp.scale.shape == ((6,) if per_channel else ())
    assert qp.zero_point.dtype == torch.int64
    torch.testing.assert_close(qp.scale, scale.reshape(qp.scale.shape), rtol=0, atol=0)
    torch.testing.assert_close(qp.zero_point, zero_point.reshape(qp.scale.shape).long(), rtol=0, atol=0)
    torch.testing.assert_close(qp.scale, own_scale.reshape(qp.scale.shape), rtol=0, atol=0)
    torch.testing.assert_close(qp.zero_point, own_zp.round().long().reshape(qp.scale.shape), rtol=0, atol=0)
    if per_channel or not signed:
        assert bool((qp.zero_point == 0).all())

    # The values lie on the grid qparams() describes. torch's kernel multiplies by 1/scale where
    # ONNX divides, so a value exactly at a rounding tie may land one step apart.
    assert bool(((y - _onnx_qdq(x, qp)).abs() <= 1e-6 + _expand(qp.scale, y, qp.axis)).all())
    assert (y != _onnx_qdq(x, qp)).float().mean() < 0.01


def _expand(scale: Tensor, x: Tensor, axis: int | None) -> Tensor:
    return scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(x.dim())])


def test_learnable_scale_learns_through_the_adapter():
    torch.manual_seed(0)
    fq = _fake_quantize(signed=False, per_channel=False, learnable=True)
    q = AOFakeQuantizer(fq)
    x = _data(False, False)
    q(x)  # static estimate from the first batch
    fq.enable_param_learning()
    before = q.qparams().scale.clone()
    y = q(x * 1.5)
    (y - x * 1.5).square().sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
    with torch.no_grad():
        fq.scale -= 0.01 * fq.scale.grad.sign()
    assert not torch.equal(q.qparams().scale, before)
    torch.testing.assert_close(q.qparams().scale, fq.scale.detach().reshape(()), rtol=0, atol=0)


@pytest.mark.parametrize("learnable", [False, True], ids=["FakeQuantize", "_LearnableFakeQuantize"])
def test_enabled_toggles_fake_quant(learnable):
    fq = _fake_quantize(signed=True, per_channel=False, learnable=learnable)
    q = AOFakeQuantizer(fq)
    x = _data(True, False)
    q(x)
    q.enabled = False
    assert q.enabled is False and int(fq.fake_quant_enabled[0]) == 0
    assert torch.equal(q(x), x)
    assert "enabled=False" in repr(q)
    q.enabled = True
    assert int(fq.fake_quant_enabled[0]) == 1 and not torch.equal(q(x), x)


@pytest.mark.parametrize(("qmin", "qmax", "bits"), [(0, 3, 2), (-7, 7, 4), (-8, 7, 4), (0, 255, 8), (-127, 127, 8)])
def test_bits_from_the_range(qmin, qmax, bits):
    dtype = torch.qint8 if qmin < 0 else torch.quint8
    q = AOFakeQuantizer(FakeQuantize(quant_min=qmin, quant_max=qmax, dtype=dtype))
    assert (q.bits, q.signed) == (bits, qmin < 0)


def test_bad_modules_are_refused():
    with pytest.raises(TypeError, match="FakeQuantizeBase.*got Linear"):
        AOFakeQuantizer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\(0, 1\) .* is 1 bits"):
        AOFakeQuantizer(FakeQuantize(quant_min=0, quant_max=1))
    with pytest.raises(ValueError, match=r"is 16 bits"):
        AOFakeQuantizer(FakeQuantize(quant_min=-(2**15), quant_max=2**15 - 1, dtype=torch.qint32))
    float_qparams = FakeQuantize(observer=ao.PerChannelMinMaxObserver, qscheme=torch.per_channel_affine_float_qparams,
                                 quant_min=0, quant_max=15, ch_axis=0)
    with pytest.raises(ValueError, match="per_channel_affine_float_qparams"):
        AOFakeQuantizer(float_qparams)


def test_qparams_before_any_data_is_an_error():
    q = AOFakeQuantizer(_fake_quantize(signed=False, per_channel=False))
    with pytest.raises(RuntimeError, match="seen no data"):
        q.qparams()


def test_missing_torch_ao_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)
    with pytest.raises(ImportError, match="needs torch.ao.quantization"):
        ao_factory(FakeQuantize, FakeQuantize)


def test_factory_ranges_follow_role_and_sign():
    method = ao_factory(FakeQuantize.with_args(observer=PerChannel, qscheme=torch.per_channel_symmetric),
                        FakeQuantize.with_args(observer=PerTensor))
    w = method(bits=4, role="weight", signed=True, channels=6, axis=0)
    a = method(bits=3, role="act", signed=False, channels=None, axis=None)
    s = method(bits=5, role="act", signed=True, channels=None, axis=None)
    assert (w.qmin, w.qmax, w.per_channel, w.axis, w.fake_quant.dtype) == (-7, 7, True, 0, torch.qint8)
    assert (a.qmin, a.qmax, a.per_channel, a.fake_quant.dtype) == (0, 7, False, torch.quint8)
    assert (s.qmin, s.qmax, s.bits) == (-16, 15, 5)
    with pytest.raises(ValueError, match="bits=9"):
        method(bits=9, role="act", signed=False, channels=None, axis=None)
    with pytest.raises(TypeError, match="weight_fq_ctor"):
        ao_factory(None, FakeQuantize)


# --------------------------------------------------------------------------- through fxfusion.quantize


def _rewritten_resnet(zoo_model):
    model, x = zoo_model("resnet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = fxfusion.rewrite(model, x)
    set_gate(rewritten, 0.5)  # mid-ramp: the sites normalize, so α learns
    return rewritten, x


def _step(model: nn.Module, x: Tensor, lr: float = 1e-2) -> tuple[float, float]:
    model.train()
    target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(1))
    before = F.mse_loss(model(x), target)
    model.zero_grad()
    before.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    with torch.no_grad():
        after = F.mse_loss(model(x), target)
    return before.item(), after.item()


@pytest.mark.parametrize("learnable", [False, True], ids=["FakeQuantize", "_LearnableFakeQuantize"])
def test_ao_factory_quantizes_and_trains_a_zoo_model(zoo_model, learnable):
    model, (x,) = _rewritten_resnet(zoo_model)
    cls, extra = (LearnableFQ, {"use_grad_scaling": True}) if learnable else (FakeQuantize, {})
    method = ao_factory(cls.with_args(observer=PerChannel, qscheme=torch.per_channel_symmetric, **extra),
                        cls.with_args(observer=PerTensor, **extra))
    torch.manual_seed(0)
    q = fxfusion.quantize(model, x, method=method, w_bits=4, a_bits=4)

    layers = {n: m for n, m in q.named_modules() if is_quantized(m)}
    assert layers
    for n, m in layers.items():
        assert isinstance(m.weight_quant, AOFakeQuantizer) and isinstance(m.act_quant, AOFakeQuantizer)
        bits = 8 if n in ("conv1", "fc") else 4
        assert (m.weight_quant.bits, m.weight_quant.qmin, m.weight_quant.per_channel) == (bits, -(2 ** (bits - 1) - 1),
                                                                                           True)
        assert m.act_quant.signed is (n == "conv1")  # ReLU inputs everywhere else
    q.train()
    q(x)  # calibrate the observers on the batch
    if learnable:
        for m in q.modules():
            if isinstance(m, LearnableFQ):
                m.enable_param_learning()
    before, after = _step(q, x)
    assert after < before
    for m in layers.values():
        qp = m.weight_quant.qparams()
        assert qp.per_channel and qp.scale.shape == (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features,)


# --------------------------------------------------------------------------- torch.ao's own flow


def test_rewritten_model_through_prepare_qat_fx(zoo_model):
    """prepare_qat_fx on a rewritten model, GABFusion as a leaf (see the module docstring)."""
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model, (x,) = _rewritten_resnet(zoo_model)
    n_sites = sum(isinstance(m, GABFusion) for m in model.modules())
    config = PrepareCustomConfig().set_non_traceable_module_classes([GABFusion])
    torch.manual_seed(0)
    prepared = prepare_qat_fx(copy.deepcopy(model).train(), ao.get_default_qat_qconfig_mapping("x86"), (x,),
                              prepare_custom_config=config)

    leaves = [n for n in prepared.graph.nodes
              if n.op == "call_module" and isinstance(prepared.get_submodule(n.target), GABFusion)]
    assert len(leaves) == n_sites, "every GABFusion stays one call_module node"
    assert not any(isinstance(m, ao.FakeQuantizeBase) for f in leaves
                   for m in prepared.get_submodule(f.target).modules()), "nothing quantized inside GABFusion"
    fake_quants = [m for m in prepared.modules() if isinstance(m, ao.FakeQuantizeBase)]
    assert len(fake_quants) > 2 * n_sites

    before, after = _step(prepared, x)
    assert all(torch.isfinite(torch.tensor([before, after])))
    assert after < before
    alphas = [prepared.get_submodule(f.target).log_alpha for f in leaves]
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in alphas), "α learns through the leaf"
