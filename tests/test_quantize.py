"""quantize: the acceptance tests of the QAT pass.

- every zoo model x every built-in method at W4A4 trains: finite forward and backward; one SGD
  step lowers a fixed loss on a fixed batch without collapsing any quantizer (the YOLO models:
  a 20-step run, marked slow, see ``test_yolo_training_lowers_the_loss``); N2UQ on DenseNet is a
  strict xfail (see ``_N2UQ_SGD``);
- placement: per-channel signed weights, per-tensor inputs whose sign follows the producer
  (ReLU unsigned, SiLU and GABFusion's LayerNorm signed), 8-bit first and last layers, skips;
- BatchNorm folding is exact, and the QAT forward quantizes the weights that are deployed;
- original parameter names survive; rewrite must come first; bad input gets a clear error;
- another technique plugs in, through a factory or a class that only follows the protocol.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fxfusion
from fxfusion.gabfusion import GABFusion
from fxfusion.passes.runtime import leaves
from fxfusion.quant import QUANTIZERS, LSQQuantizer, QParams, Quantizer, QuantizerProtocol
from fxfusion.quant.layers import QUANT_LAYERS, is_quantized
from fxfusion.zoo import ZOO

METHODS = sorted(QUANTIZERS)
MODELS = sorted(ZOO)
ROUGH = ["yolov5", "yolov8"]  # see test_yolo_training_lowers_the_loss
SMOOTH = [m for m in MODELS if m not in ROUGH]
# One plain SGD step, the same for every model and method. Measured on 5 seeds of batch and
# target: at 1e-2 every method lowers the loss on every SMOOTH model (worst ratio 0.991); at 1e-3
# the step is too short to average over the 4-bit rounding flips (LSQ rose in 11 of 40 cases).
LR = 1e-2
ROUGH_LR, ROUGH_STEPS = 1e-3, 20

# The layers that read the model input and the layers whose output is a model output.
FIRST_LAST = {
    "yolov5": ({"model.0.conv"}, {"model.24.m.0", "model.24.m.1", "model.24.m.2"}),
    "yolov8": ({"model.0.conv"}, {f"model.22.{branch}.{level}.2" for branch in ("cv2", "cv3") for level in range(3)}),
    "unet": ({"inc.0.0"}, {"outc"}),
    "resnet": ({"conv1"}, {"fc"}),
    "densenet": ({"stem.0"}, {"classifier"}),
    "inception": ({"stem.0.0"}, {"fc"}),
    "fpn": ({"backbone.stem.0"}, {f"fpn.output.{i}" for i in range(4)}),
    "transformer": ({"patch_embed"}, {"head"}),
}

# N2UQ's learned parameters get LSQ's gradient scale 1/sqrt(N*Qp) (fxfusion/quant/n2uq.py); without
# it one SGD step at LR collapsed an activation step on every zoo model. One case remains: DenseNet's
# classifier input is a pooled (2, C) tensor (N = 2C elements, step ~2e-3), and one SGD step at
# LR = 1e-2 still shrinks that step 4x. Strict: an XPASS means it was fixed.
_N2UQ_SGD = pytest.mark.xfail(
    strict=True,
    reason="N2UQ on DenseNet: one SGD step at lr 1e-2 shrinks the pooled classifier input's act step 4x",
)


# --------------------------------------------------------------------------- helpers

_REWRITTEN: dict[str, tuple[nn.Module, tuple]] = {}


@pytest.fixture
def rewritten(zoo_model):
    """``rewritten(name) -> (rewritten zoo model, example inputs)``, rewritten once per session."""

    def get(name: str):
        if name not in _REWRITTEN:
            model, x = zoo_model(name)
            _REWRITTEN[name] = (_rewrite(model, x), x)
        model, x = _REWRITTEN[name]
        return copy.deepcopy(model), x

    return get


def _rewrite(model: nn.Module, x) -> nn.Module:
    # The paper's form (a LayerNorm at every site): the default, function-preserving form computes
    # the un-rewritten model exactly, quantized or not (tests/test_preserve.py), so it would test
    # nothing here that quantize(model) does not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx / zoo warnings, unrelated to quantize
        return fxfusion.rewrite(model, x, init="paper", fold="any")


def _quantize(model: nn.Module, x, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return fxfusion.quantize(model, x, **kw)


def _outputs(model: nn.Module, x) -> list[Tensor]:
    return [t for t in leaves(model(*x)) if isinstance(t, Tensor)]


def _quantizers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizerProtocol)}


def _qlayers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_quantized(m)}


def _mse(outputs: list[Tensor], targets: list[Tensor]) -> Tensor:
    return sum(F.mse_loss(o, t) for o, t in zip(outputs, targets, strict=True))


def _random_targets(model: nn.Module, x) -> list[Tensor]:
    with torch.no_grad():  # on a copy: a train-mode forward would update BatchNorm statistics
        shapes = [t.shape for t in _outputs(copy.deepcopy(model).train(), x)]
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=generator) for s in shapes]


def _sgd_step(model: nn.Module, x, targets: list[Tensor], lr: float = LR) -> tuple[float, float]:
    """One SGD step on the fixed loss; returns (loss before, loss after), both in train mode."""
    model.train()
    before = _mse(_outputs(model, x), targets)
    model.zero_grad()
    before.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    with torch.no_grad():
        after = _mse(_outputs(model, x), targets)
    return before.item(), after.item()


def _act_scales(model: nn.Module) -> dict[str, Tensor]:
    return {n: m.act_quant.qparams().scale.clone() for n, m in _qlayers(model).items() if m.act_quant is not None}


def _bn_after_conv(model: nn.Module, x) -> set[str]:
    """Paths of the BatchNorms whose input is a Conv's output tensor, seen in one eval forward."""
    conv_out: list[Tensor] = []
    bn_in: dict[str, Tensor] = {}  # holding the tensors keeps their ids unique

    def after_conv(module, args, out) -> None:
        conv_out.append(out)

    def before_bn(name: str):
        def hook(module, args) -> None:
            bn_in[name] = args[0]
        return hook

    handles = []
    for name, m in model.named_modules():
        if type(m) in (nn.Conv1d, nn.Conv2d):
            handles.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(before_bn(name)))
    try:
        with torch.no_grad():
            model.eval()(*x)
    finally:
        for h in handles:
            h.remove()
    return {n for n, t in bn_in.items() if any(t is c for c in conv_out)}


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_forward_and_backward_are_finite(rewritten, name, method):
    model, x = rewritten(name)
    targets = _random_targets(model, x)
    q = _quantize(model, x, method=method, w_bits=4, a_bits=4).train()

    outputs = _outputs(q, x)
    assert all(torch.isfinite(t).all() for t in outputs)
    loss = _mse(outputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in q.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    for n, m in _qlayers(q).items():
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, f"no gradient reaches {n}.weight"
    learned = [p for m in _quantizers(q).values() for p in m.parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learned)
    assert all(p.grad is not None for f in q.modules() if isinstance(f, GABFusion) for p in f.parameters())


@pytest.mark.parametrize(
    "method", METHODS
)
@pytest.mark.parametrize("name", SMOOTH)
def test_one_sgd_step_lowers_the_loss(request, rewritten, name, method):
    if (name, method) == ("densenet", "n2uq"):
        request.applymarker(_N2UQ_SGD)
    model, x = rewritten(name)
    targets = _random_targets(model, x)
    q = _quantize(model, x, method=method, w_bits=4, a_bits=4).train()
    with torch.no_grad():
        _outputs(q, x)  # the quantizers initialize on the first batch
    scales = _act_scales(q)

    before, after = _sgd_step(q, x, targets)
    assert math.isfinite(after)
    # A real decrease: no input quantizer collapsed (which zeroes a layer and fakes a decrease).
    for n, s in _act_scales(q).items():
        assert bool((s >= 0.25 * scales[n]).all()), f"{n}.act_quant scale collapsed: {scales[n]} -> {s}"
    assert after < before, f"{name}/{method}: loss {before:.5f} -> {after:.5f} after one SGD step (lr={LR})"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ROUGH)
def test_yolo_training_lowers_the_loss(rewritten, name, method):
    """The YOLO zoo models train over a short run; one step is within their W4A4 loss roughness.

    At random init these ~60-layer SiLU detectors have a large gain (88% of the float gradient
    norm sits on the first conv). Measured on 5 seeds of batch and target: moving the W4A4
    parameters by 1e-3 in a random direction changes the loss by 1-5%, while along the float
    model's own gradient the loss drops by at most ~0.3%; so one SGD step lowers the W4A4 loss
    in only 50-90% of the seeds (any method, lr 1e-3..1e-2, with or without gradient clipping),
    and at lr=1e-2 the float model's step rises too. Over 20 steps at lr=1e-3 (stable in float),
    the mean of the last 5 losses is 2-10% below the first 5 for every method on 4 seeds.
    """
    model, x = rewritten(name)
    targets = _random_targets(model, x)
    q = _quantize(model, x, method=method, w_bits=4, a_bits=4).train()
    with torch.no_grad():
        _outputs(q, x)
    scales = _act_scales(q)
    opt = torch.optim.SGD(q.parameters(), lr=ROUGH_LR)
    losses = []
    for _ in range(ROUGH_STEPS):
        opt.zero_grad()
        loss = _mse(_outputs(q, x), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"{name}/{method}: mean loss of the first 5 steps {first:.4f}, of the last 5 {last:.4f}"
    for n, s in _act_scales(q).items():
        assert bool((s >= 0.25 * scales[n]).all()), f"{n}.act_quant scale collapsed: {scales[n]} -> {s}"


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_and_linear_is_quantized(rewritten, name):
    model, x = rewritten(name)
    float_layers = {n for n, m in model.named_modules() if type(m) in QUANT_LAYERS}
    q = _quantize(model, x, method="lsq")

    layers = _qlayers(q)
    assert set(layers) == float_layers
    assert not _qlayers(model), "the input model must not be mutated"
    report = q.fxfusion_reports["quantize"]
    assert {r["layer"] for r in report.layers} == float_layers
    for n, m in layers.items():
        assert isinstance(m, type(model.get_submodule(n))), "a quantized layer is still its float class"
        wq, aq = m.weight_quant, m.act_quant
        assert wq.per_channel and wq.axis == 0 and wq.signed and wq.channels == m.weight.shape[0], n
        assert not aq.per_channel and aq.axis is None, n

    first, last = FIRST_LAST[name]
    assert {r["layer"] for r in report.layers if r["role"] == "first"} == first
    assert {r["layer"] for r in report.layers if r["role"] == "last"} == last
    for n, m in layers.items():
        bits = 8 if n in first | last else 4
        assert (m.weight_quant.bits, m.act_quant.bits) == (bits, bits), n

    # GABFusion modules are left alone: no quantizer inside, and they stay float.
    fusions = [m for m in q.modules() if isinstance(m, GABFusion)]
    assert len(fusions) == ZOO[name].expected_sites
    for f in fusions:
        assert not any(isinstance(m, QuantizerProtocol) or is_quantized(m) for m in f.modules())


def test_first_last_bits_none_uses_the_common_width(rewritten):
    model, x = rewritten("resnet")
    q = _quantize(model, x, method="minmax", w_bits=4, a_bits=3, first_last_bits=None)
    bits = {(m.weight_quant.bits, m.act_quant.bits) for m in _qlayers(q).values()}
    assert bits == {(4, 3)}


@pytest.mark.parametrize(
    ("name", "layer", "signed"),
    [
        ("resnet", "layer1.0.conv1", False),  # after ReLU + max-pool
        ("resnet", "layer2.0.downsample.0", False),  # after ReLU(GABFusion(...))
        ("resnet", "fc", False),  # after ReLU + avgpool + flatten
        ("unet", "inc.1.0", False),  # after ReLU
        ("unet", "down1.1.0.0", False),  # after ReLU + max-pool
        ("unet", "outc", False),
        ("unet", "up3.conv.0.0", True),  # after GABFusion's LayerNorm (cat of ConvTranspose and skip)
        ("yolov5", "model.1.conv", True),  # after SiLU
        ("yolov5", "model.2.m.0.cv2.conv", True),
        ("yolov5", "model.24.m.0", True),
        ("transformer", "blocks.0.mlp.fc2", True),  # after GELU
        ("resnet", "conv1", True),  # the model input
    ],
)
def test_input_signedness(rewritten, name, layer, signed):
    model, x = rewritten(name)
    q = _quantize(model, x, method="pact")
    assert q.get_submodule(layer).act_quant.signed is signed


class _TwoBranch(nn.Module):
    """conv-relu on two branches, cat, conv: the consumer reads a cat of ReLU outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def test_gabfusion_layernorm_makes_the_consumer_input_signed():
    torch.manual_seed(0)
    model, x = _TwoBranch(), torch.randn(2, 3, 8, 8)
    plain = _quantize(model, x, first_last_bits=None)
    assert plain.head.act_quant.signed is False  # cat of ReLU outputs
    fused = _quantize(_rewrite(model, x), x, first_last_bits=None)
    assert isinstance(fused.gabfusion0, GABFusion)
    assert fused.head.act_quant.signed is True  # LN(α·a, α·b) has both signs
    assert not any(isinstance(m, QuantizerProtocol) for m in fused.gabfusion0.modules())


def test_gabfusion_without_norm_keeps_relu_inputs_unsigned():
    # α = exp(log α) > 0, so α·relu(x) is still non-negative: the grid may stay unsigned.
    torch.manual_seed(0)
    model, x = _TwoBranch(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fxfusion.rewrite(model, x, norm="none", init="paper")
    assert _quantize(fused, x, first_last_bits=None).head.act_quant.signed is False


def test_skip_by_regex_keeps_the_yolov5_detect_head_float(rewritten):
    model, x = rewritten("yolov5")
    q = _quantize(model, x, method="lsq", skip=r"^model\.24\.")
    head = [n for n, m in q.named_modules() if n.startswith("model.24.m.") and isinstance(m, nn.Conv2d)]
    assert len(head) == 3
    assert not any(is_quantized(q.get_submodule(n)) for n in head)
    assert type(q.get_submodule("model.24.m.0")) is nn.Conv2d
    report = q.fxfusion_reports["quantize"]
    assert {r["layer"] for r in report.float_layers if r["reason"] == "skipped on request"} == set(head)
    assert len(_qlayers(q)) == len(_qlayers(_quantize(model, x))) - 3
    q.train()
    assert all(torch.isfinite(t).all() for t in _outputs(q, x))


def test_skip_by_type(rewritten):
    model, x = rewritten("transformer")
    q = _quantize(model, x, skip_types=[nn.Linear])
    assert set(_qlayers(q)) == {"patch_embed"}
    report = q.fxfusion_reports["quantize"]
    assert len([r for r in report.float_layers if r["type"] == "Linear"]) == 9


def test_skip_regex_that_matches_nothing_warns(rewritten):
    model, x = rewritten("resnet")
    nothing = r"nothing\.here"
    with pytest.warns(UserWarning, match=re.escape(f"skip={nothing!r} matched no Conv/Linear")):
        _quantize(model, x, skip=nothing)
    # ... even when skip_types did skip something
    with pytest.warns(UserWarning, match="matched no Conv/Linear"):
        q = _quantize(model, x, skip=nothing, skip_types=[nn.Linear])
    assert not is_quantized(q.fc)


def test_invalid_skip_regex_is_a_value_error(rewritten):
    model, x = rewritten("resnet")
    with pytest.raises(ValueError, match=r"skip='model\[' is not a valid regular expression"):
        _quantize(model, x, skip="model[")


def test_unsupported_layers_stay_float_and_are_reported(rewritten):
    model, x = rewritten("unet")
    q = _quantize(model, x)
    for n in ("up1.up", "up2.up", "up3.up"):
        assert type(q.get_submodule(n)) is nn.ConvTranspose2d
    reasons = {r["layer"]: r["reason"] for r in q.fxfusion_reports["quantize"].float_layers}
    assert set(reasons) == {"up1.up", "up2.up", "up3.up"}
    assert all("no quantized form" in r for r in reasons.values())


# --------------------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("name", MODELS)
def test_bn_fold_is_exact(rewritten, name):
    model, x = rewritten(name)
    expected_folds = _bn_after_conv(model, x)
    q = _quantize(model, x, method="lsq")
    report = q.fxfusion_reports["quantize"]
    assert set(report.bn_folded) == expected_folds
    for n in expected_folds:
        assert type(q.get_submodule(n)) is nn.Identity, n
    # the others (pre-activation BNs in DenseNet) stay
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in expected_folds:
            assert type(q.get_submodule(n)) is type(m), n

    # Exactness, without float32 rounding in the way: fold and compare in float64.
    model64, x64 = copy.deepcopy(model).double(), tuple(t.double() for t in x)
    for r, o in _float_pairs(model64, _quantize(model64, x64, method="lsq"), x64):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-5)
        assert (o - r).abs().max() <= 1e-10 * max(1.0, r.abs().max().item())
    # In float32 the folded weights differ from W, BN by rounding only (YOLO's gain makes it ~1e-5).
    for r, o in _float_pairs(model, q, x):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-4 * max(1.0, r.abs().max().item()))


def _float_pairs(model: nn.Module, q: nn.Module, x: tuple) -> list[tuple[Tensor, Tensor]]:
    """(float output, quantized model's output with every quantizer off), eval mode."""
    for quantizer in _quantizers(q).values():
        quantizer.enabled = False
    model.eval()
    q.eval()
    with torch.no_grad():
        return list(zip(_outputs(model, x), _outputs(q, x), strict=True))


def test_qat_forward_quantizes_exactly_the_deployed_weights(rewritten):
    model, x = rewritten("resnet")
    conv, bn = model.conv1, model.bn1
    sigma = torch.sqrt(bn.running_var + bn.eps)
    w_expected = conv.weight.detach() * (bn.weight.detach() / sigma).reshape(-1, 1, 1, 1)
    b_expected = (bn.bias - bn.running_mean * bn.weight / sigma).detach()  # conv1 has no bias

    q = _quantize(model, x, method="minmax")
    assert type(q.bn1) is nn.Identity
    torch.testing.assert_close(q.conv1.weight.detach(), w_expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.conv1.bias.detach(), b_expected, rtol=1e-6, atol=1e-7)

    seen: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module, args) -> None:
            seen[name] = args[0]
        return hook

    hooks = [m.weight_quant.register_forward_pre_hook(record(n)) for n, m in _qlayers(q).items()]
    q.train()
    _outputs(q, x)
    for h in hooks:
        h.remove()
    layers = _qlayers(q)
    assert set(seen) == set(layers)
    for n, m in layers.items():
        assert seen[n] is m.weight, f"{n}: the QAT forward quantizes something else than {n}.weight"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in q.modules())


def test_fold_bn_false_keeps_batchnorm(rewritten):
    model, x = rewritten("resnet")
    q = _quantize(model, x, fold_bn=False)
    assert type(q.bn1) is nn.BatchNorm2d
    assert q.fxfusion_reports["quantize"].bn_folded == []
    torch.testing.assert_close(q.conv1.weight, model.conv1.weight, rtol=0, atol=0)


# --------------------------------------------------------------------------- names, order


@pytest.mark.parametrize("name", ["resnet", "yolov5", "transformer"])
def test_parameter_names_survive(rewritten, name):
    model, x = rewritten(name)
    keys = {f"{n}.{p}" for n, m in model.named_modules() if type(m) in QUANT_LAYERS
            for p, v in m.named_parameters(recurse=False) if v is not None}
    q = _quantize(model, x)
    state = q.state_dict()
    assert keys <= set(state)
    for k in keys:
        assert state[k].shape == model.state_dict()[k].shape, k
    # nothing under a new top-level prefix: the quantizers hang below their layer
    new = set(state) - set(model.state_dict())
    assert all(".weight_quant." in k or ".act_quant." in k or k.endswith(".bias") for k in new), new


def test_rewrite_then_quantize_works_but_not_the_other_way(rewritten, zoo_model):
    model, x = zoo_model("resnet")
    q = _quantize(_rewrite(model, x), x)
    assert _qlayers(q) and any(isinstance(m, GABFusion) for m in q.modules())

    plain = _quantize(model, x)
    with pytest.raises(ValueError, match="rewrite first"):
        fxfusion.rewrite(plain, x)


def test_quantizing_twice_raises(rewritten):
    model, x = rewritten("resnet")
    q = _quantize(model, x)
    with pytest.raises(ValueError, match="already quantized"):
        _quantize(q, x)


# --------------------------------------------------------------------------- bad input


def test_unknown_method_lists_the_methods():
    model, x = _TwoBranch(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown method 'apot'") as info:
        fxfusion.quantize(model, x, method="apot")
    assert all(m in str(info.value) for m in METHODS)
    assert "factory" in str(info.value)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxfusion.quantize(lambda x: x, torch.randn(1))


# --------------------------------------------------------------------------- other techniques


def test_user_factory(rewritten):
    calls: list[dict] = []

    def factory(**kw):
        calls.append(kw)
        return LSQQuantizer(kw["bits"], signed=kw["signed"], role=kw["role"], per_channel=kw["channels"] is not None,
                            channels=kw["channels"], axis=kw["axis"])

    model, x = rewritten("resnet")
    q = _quantize(model, x, method=factory, w_bits=3, a_bits=5)
    layers = _qlayers(q)
    assert len(calls) == 2 * len(layers)
    assert {c["role"] for c in calls} == {"weight", "act"}
    assert set(calls[0]) == {"bits", "role", "signed", "channels", "axis"}
    assert {(m.weight_quant.bits, m.act_quant.bits) for n, m in layers.items() if n not in ("conv1", "fc")} == {(3, 5)}
    before, after = _sgd_step(q, x, _random_targets(model, x))
    assert after < before


class PowerOfTwoQuantizer(nn.Module):
    """A quantizer written from the protocol alone: max-abs range, power-of-two scale, STE.

    It does not subclass fxfusion's ``Quantizer`` and uses none of its helpers.
    """

    def __init__(self, *, bits: int, role: str, signed: bool, channels: int | None, axis: int | None) -> None:
        super().__init__()
        self.bits, self.signed, self.enabled = bits, signed, True
        self.per_channel = channels is not None
        self.axis = axis if self.per_channel else None
        half = 2 ** (bits - 1)
        # weights: symmetric -(2^(b-1)-1)..2^(b-1)-1; signed inputs: full range; else 0..2^b-1
        self.qmin, self.qmax = ((-(half - 1) if role == "weight" else -half), half - 1) if signed else (0, 2**bits - 1)
        self.register_buffer("scale", torch.ones(channels) if self.per_channel else torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        with torch.no_grad():
            flat = x.movedim(self.axis, 0).flatten(1) if self.per_channel else x.reshape(1, -1)
            amax = flat.abs().amax(1).reshape(self.scale.shape).clamp(min=1e-8)
            self.scale.copy_(torch.exp2(torch.ceil(torch.log2(amax / self.qmax))))
        shape = [-1 if d == self.axis else 1 for d in range(x.dim())] if self.per_channel else []
        s = self.scale.reshape(shape)
        v = x / s
        code = torch.clamp(v + (torch.round(v) - v).detach(), self.qmin, self.qmax)
        return code * s

    def qparams(self) -> QParams:
        zero = torch.zeros_like(self.scale, dtype=torch.int64)
        return QParams(self.scale.clone(), zero, self.qmin, self.qmax, self.axis, self.bits)


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_protocol_only_quantizer_plugs_in_and_trains(rewritten, name):
    model, x = rewritten(name)
    q = _quantize(model, x, method=PowerOfTwoQuantizer)
    quantizers = _quantizers(q)
    assert quantizers and all(isinstance(m, PowerOfTwoQuantizer) for m in quantizers.values())
    assert not any(isinstance(m, Quantizer) for m in quantizers.values())
    assert len(quantizers) == 2 * len(_qlayers(q))

    before, after = _sgd_step(q, x, _random_targets(model, x))
    assert after < before
    for m in quantizers.values():  # the grid is a power of two, as declared in qparams()
        qp = m.qparams()
        assert torch.equal(torch.log2(qp.scale), torch.round(torch.log2(qp.scale)))
