"""Power-of-two scales (``quantize(..., pow2=True)``): every grid is a power of two, and the
exported ONNX file then computes the deployed model's outputs bit for bit in onnxruntime.

Why it matters (issue 14): with free float scales, onnxruntime and PyTorch sum a conv in different
orders, so a value on a rounding tie may get neighbouring codes in the two runtimes, and a deep
network can amplify those one-step flips beyond verify's 1e-2 bound. With power-of-two scales the
products and partial sums are exact float32 numbers, so no order can change them.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxfusion
from fxfusion.deployed import ChannelAffine, OrtHardsigmoid, OrtHardswish
from fxfusion.gabfusion import set_gate
from fxfusion.quant import QUANTIZERS, make_quantizer


def _is_pow2(t: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(t.detach())
    return bool((mantissa == 0.5).all())


@pytest.mark.parametrize("method", sorted(QUANTIZERS))
@pytest.mark.parametrize("role,signed,channels", [("weight", True, 6), ("act", False, None), ("act", True, None)])
def test_every_builtin_quantizer_uses_a_power_of_two_grid(method, role, signed, channels):
    torch.manual_seed(0)
    q = make_quantizer(method, bits=4, role=role, signed=signed, channels=channels, pow2=True)
    x = torch.randn(6, 4, 5, 5) * 0.37  # weights: 6 output channels on axis 0
    if not signed:
        x = x.abs()
    q.train()
    q(x)  # initializes
    q.eval()
    y = q(x)
    p = q.qparams()
    assert _is_pow2(p.scale), p.scale
    codes = y / (p.scale.view(-1, 1, 1, 1) if p.per_channel else p.scale)  # = code - zero point
    assert torch.equal(codes, torch.round(codes)), "the forward output lies on the power-of-two grid"
    assert "pow2=True" in repr(q)


def test_the_scale_snaps_to_the_nearest_power_of_two_in_log2_and_the_step_still_learns():
    q = make_quantizer("lsq", bits=4, role="act", signed=False, pow2=True)
    q(torch.rand(64))
    for step, snapped in [(0.3, 0.25), (0.36, 0.5), (0.5, 0.5), (3.0, 4.0)]:
        with torch.no_grad():
            q.step.fill_(step)
        assert float(q.qparams().scale) == snapped
    x = torch.rand(256) * 8
    q.step.grad = None
    q(x).sum().backward()
    assert q.step.grad is not None and torch.isfinite(q.step.grad) and float(q.step.grad) != 0.0


def test_pow2_is_checked():
    with pytest.raises(TypeError, match="pow2 must be a bool"):
        make_quantizer("lsq", bits=4, role="act", signed=False, pow2="yes")
    x = torch.randn(1, 3, 8, 8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(TypeError, match="pow2 must be a bool"):
        fxfusion.quantize(net, x, pow2=1)
    with pytest.raises(ValueError, match="custom factory"):
        fxfusion.quantize(net, x, method=lambda **kw: make_quantizer("lsq", **kw), pow2=True)


class _Branchy(nn.Module):
    """Stem, a residual add, a cat of two branches, max pooling, a float output conv: the ops the
    promise covers (conv, linear, add, concat, ReLU, max pooling) in a multi-branch layout."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(i: int, o: int, relu: bool = True) -> nn.Sequential:
            layers = [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o)]
            return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

        self.stem = cbr(3, 16)
        self.a, self.b = cbr(16, 16), cbr(16, 16, relu=False)
        self.c, self.d = cbr(16, 24), cbr(16, 8)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(32, 10, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        x = torch.relu(x + self.b(self.a(x)))
        x = self.pool(torch.cat([self.c(x), self.d(x)], 1))
        y = self.head(x)
        return y, self.fc(y.mean((2, 3)))


def _deployed(pow2: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = _Branchy().eval(), torch.randn(2, 3, 24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxfusion.quantize(fxfusion.rewrite(model, x), x, method="lsq", w_bits=4, a_bits=4, pow2=pow2)
    set_gate(qat, 1.0)  # every site open, so that deploy folds each α
    opt = torch.optim.SGD(qat.parameters(), lr=1e-2, momentum=0.9)
    qat.train()
    for _ in range(3):
        loss = sum(t.pow(2).mean() for t in qat(torch.randn(4, 3, 24, 24)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return fxfusion.deploy(qat, [torch.randn(4, 3, 24, 24) for _ in range(2)], progress=False), x


def _differing_outputs(model: nn.Module, path, x: torch.Tensor) -> list[float]:
    """Share of output elements where onnxruntime's bits differ from PyTorch's, per output and level."""
    with torch.no_grad():
        ref = [t.numpy() for t in model.eval()(x)]
    shares = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        shares += [float(np.mean(a != b)) for a, b in zip(ref, got)]
    return shares


def test_pow2_export_is_bit_exact_in_onnxruntime_after_rewrite_qat_and_deploy(tmp_path):
    deployed, x = _deployed(pow2=True)
    scales = [m.qparams().scale for m in deployed.modules() if hasattr(m, "qparams") and hasattr(m, "pow2")]
    assert scales and all(_is_pow2(s) for s in scales), "deploy's folds and re-fits keep the scales powers of two"
    path = tmp_path / "pow2.onnx"
    fxfusion.export_onnx(deployed, x, path)
    x_test = torch.randn(3, 3, 24, 24) * 1.7
    assert _differing_outputs(deployed, path, x_test) == [0.0, 0.0, 0.0, 0.0]
    report = fxfusion.verify_onnx(deployed, path, x_test)
    assert report.passed and report.max_abs_error == 0.0


def test_float_scales_differ_in_the_last_bits_which_is_what_pow2_removes(tmp_path):
    """The same pipeline with free float scales: the two runtimes' float outputs differ by rounding
    (the comparison above is sensitive enough to see it), while verify still passes this model."""
    deployed, x = _deployed(pow2=False)
    path = tmp_path / "float.onnx"
    fxfusion.export_onnx(deployed, x, path)
    x_test = torch.randn(3, 3, 24, 24) * 1.7
    assert max(_differing_outputs(deployed, path, x_test)) > 0.0
    assert fxfusion.verify_onnx(deployed, path, x_test).passed


def test_a_quantizer_pickled_before_the_option_existed_loads_with_free_scales():
    import pickle

    q = make_quantizer("lsq", bits=4, role="act", signed=False)
    q(torch.rand(32))
    del q.__dict__["pow2"]  # what an older checkpoint holds
    old = pickle.loads(pickle.dumps(q))
    with torch.no_grad():
        old.step.fill_(0.3)
    assert old.pow2 is False and float(old.qparams().scale) == pytest.approx(0.3)


class _PreActivation(nn.Module):
    """DenseNet's pattern: a concat read by BatchNorm → ReLU → conv, so the BatchNorm folds into no conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.norm = nn.BatchNorm2d(12)
        self.conv = nn.Conv2d(12, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.stem(x))
        h = torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1)))
        return self.conv(h), h  # h: the BatchNorm's float output itself, where its rounding shows


@pytest.mark.parametrize("pow2", [True, False])
def test_a_batchnorm_that_folds_into_no_conv_is_deployed_as_two_float_ops_only_with_pow2(tmp_path, pow2):
    """onnxruntime's BatchNormalization rounds differently from PyTorch's; x·a + b rounds the same."""
    torch.manual_seed(0)
    model = _PreActivation().eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxfusion.quantize(model, x, method="lsq", w_bits=4, a_bits=4, pow2=pow2)
    qat(x)
    deployed = fxfusion.deploy(qat, [torch.randn(4, 3, 16, 16)], progress=False)
    report = deployed.fxfusion_reports["deploy"]
    path = tmp_path / "m.onnx"
    fxfusion.export_onnx(deployed, x, path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if pow2:
        assert report.bn_as_affine == ["norm"] and isinstance(deployed.norm, ChannelAffine)
        assert "BatchNormalization" not in ops and {"Mul", "Add"} <= ops
        assert not {"Reshape", "Constant"} & ops, "the affine's constants are stored broadcastable"
        assert report.output_deviation["max_vs_undeployed"] <= 1e-5  # the same affine, rounded once more
        assert _differing_outputs(deployed, path, torch.randn(4, 3, 16, 16) * 2) == [0.0] * 4
    else:
        assert report.bn_as_affine == [] and isinstance(deployed.norm, nn.BatchNorm2d)
        assert "BatchNormalization" in ops



@pytest.mark.parametrize("bn, shape", [(nn.BatchNorm1d(5), (3, 5)), (nn.BatchNorm1d(5), (3, 5, 7)),
                                       (nn.BatchNorm2d(5), (3, 5, 4, 4)), (nn.BatchNorm3d(5), (2, 5, 3, 3, 3))])
def test_channel_affine_computes_the_batchnorm_for_each_input_rank(bn, shape):
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(shape)
    affine = ChannelAffine.from_batchnorm(bn, x.dim())
    torch.testing.assert_close(affine(x), bn(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="without running statistics"):
        ChannelAffine.from_batchnorm(nn.BatchNorm2d(5, track_running_stats=False), 4)


class _NormAct(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward does more (timm's BatchNormAct2d: the norm, then ReLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_a_batchnorm_subclass_is_kept_and_named_in_a_warning_not_replaced_by_its_affine():
    """Replacing it by x·a + b would silently drop its activation (found on timm's DPN-68)."""
    torch.manual_seed(0)
    model = _PreActivation().eval()
    model.norm = _NormAct(12).eval()
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxfusion.quantize(model, x, method="lsq", w_bits=4, a_bits=4, pow2=True)
    qat(x)
    with pytest.warns(UserWarning, match=r"1 BatchNorm\(s\) stay BatchNorm \(norm\): a subclass"):
        deployed = fxfusion.deploy(qat, [torch.randn(4, 3, 16, 16)], progress=False)
    assert type(deployed.norm) is _NormAct
    report = deployed.fxfusion_reports["deploy"]
    assert report.bn_as_affine == [] and report.output_deviation["max_vs_undeployed"] == 0.0


def _run_single_op(op: str, x: np.ndarray, **attrs) -> np.ndarray:
    node = onnx.helper.make_node(op, ["x"], ["y"], **attrs)
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("x", "y")]
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", info[:1], info[1:]),
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("ours, theirs, op, attrs", [
    (OrtHardsigmoid(), nn.Hardsigmoid(), "HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}),
    (OrtHardswish(), nn.Hardswish(), "HardSwish", {})])
def test_ort_hard_activations_compute_onnxruntimes_bits_where_torchs_kernel_does_not(ours, theirs, op, attrs):
    x = torch.randn(1 << 16) * 4
    got = _run_single_op(op, x.numpy(), **attrs)
    assert np.array_equal(ours(x).numpy(), got)
    assert np.mean(theirs(x).numpy() != got) > 0.1, "PyTorch's own kernel differs in the last bit"
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)  # the same function
    x.requires_grad_(True)
    ours(x).sum().backward()  # still trainable
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _Excite(nn.Module):
    """MobileNetV3's pattern: hard-swish, then a squeeze-and-excitation scale from a hard-sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish()
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.gate, self.head = nn.Hardsigmoid(), nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.stem(x))
        s = self.gate(self.fc2(torch.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.head(h * s), s  # s: the hard-sigmoid's float output itself


@pytest.mark.parametrize("pow2", [True, False])
def test_hard_activations_are_deployed_with_onnxruntimes_rounding_only_with_pow2(tmp_path, pow2):
    """Found on torchvision's MobileNetV3: with pow2 its export missed verify's bound (0.12 of the
    range) through the hard-sigmoid's last bit alone; with these modules it is bit-exact."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxfusion.quantize(_Excite().eval(), x, method="lsq", w_bits=4, a_bits=4, pow2=pow2)
    qat(x)
    deployed = fxfusion.deploy(qat, [torch.randn(4, 3, 16, 16)], progress=False)
    report = deployed.fxfusion_reports["deploy"]
    path = tmp_path / "m.onnx"
    fxfusion.export_onnx(deployed, x, path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("HardSwish") == 1 and ops.count("HardSigmoid") == 1, "still one node each"
    if pow2:
        assert report.ort_activations == ["act", "gate"] and "computed with onnxruntime's rounding" in str(report)
        assert isinstance(deployed.act, OrtHardswish) and isinstance(deployed.gate, OrtHardsigmoid)
        assert report.output_deviation["max_vs_undeployed"] <= 1e-5
        assert _differing_outputs(deployed, path, torch.randn(4, 3, 16, 16) * 2) == [0.0] * 4
    else:
        assert report.ort_activations == [] and type(deployed.gate) is nn.Hardsigmoid
