"""export_onnx and verify_onnx: real QDQ graphs that onnxruntime runs like the PyTorch model."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion
from fxfusion.passes.export import OnnxExportError, export_onnx
from fxfusion.passes.verify import verify_onnx
from fxfusion.quant import fake_quantize, make_quantizer
from fxfusion.quant.layers import to_quantized
from fxfusion.report import dumps

METHODS = ["lsq", "pact", "dsq", "n2uq", "minmax"]
INT4, UINT4, INT8, UINT8 = TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- tiny models


class ConvNet(nn.Module):
    """conv-ReLU, conv-SiLU, a 1x1 conv with a residual add, global pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        b = nn.functional.silu(self.c2(a))
        c = self.c3(b) + a
        return self.head(c.mean((2, 3)))


class TokenBlock(nn.Module):
    """A (N, L, D) MLP block: Linear on 3-D inputs exports as MatMul, not Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


# Whether each layer's input can be negative: the image, ReLU output, SiLU output, pooled sum.
CONV_ACT_SIGNED = {"c1": True, "c2": False, "c3": True, "head": True}


def quantize_layer(layer: nn.Module, method: str, bits: int, act_signed: bool | None) -> nn.Module:
    channels = layer.out_channels if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else layer.out_features
    wq = make_quantizer(method, bits=bits, role="weight", signed=True, channels=channels)
    aq = None if act_signed is None else make_quantizer(method, bits=bits, role="act", signed=act_signed)
    return to_quantized(layer, wq, aq)


def quantized(model: nn.Module, method: str, bits: int, signed: dict[str, bool | None], shape: tuple) -> nn.Module:
    for name, act_signed in signed.items():
        setattr(model, name, quantize_layer(getattr(model, name), method, bits, act_signed))
    model.train()
    for _ in range(2):  # initialise the quantizers, move the running ranges
        model(torch.randn(shape))
    return model.eval()


def conv_net(method: str, bits: int) -> nn.Module:
    return quantized(ConvNet(), method, bits, CONV_ACT_SIGNED, (4, 3, 12, 12))


def initializer_types(path: str) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(path).graph.initializer}


def zero_point_types(path: str, op: str) -> list[int]:
    graph = onnx.load(path).graph
    types = {t.name: t.data_type for t in graph.initializer}
    return [types[n.input[2]] for n in graph.node if n.op_type == op]


# --------------------------------------------------------------------------- parity


class OneLayer(nn.Module):
    """One quantized layer on the input: any difference would come from the export itself."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS = {  # name -> (layer, input shape, activation signed)
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, padding=1), (6, 4, 10, 10), True),
    "conv1d_relu_input": (lambda: nn.Conv1d(4, 8, 3), (6, 4, 20), False),
    "linear_tokens": (lambda: nn.Linear(16, 8), (6, 5, 16), True),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_single_layer_is_exact(tmp_path, method: str, bits: int, layer: str) -> None:
    build, shape, signed = LAYERS[layer]
    model = OneLayer(quantize_layer(build(), method, bits, signed)).train()

    def data() -> torch.Tensor:
        x = 2 * torch.randn(shape)
        return x if signed else x.relu()

    for _ in range(2):
        model(data())
    model.eval()
    path = str(tmp_path / "one.onnx")
    export_onnx(model, data(), path)

    # the integer weights dequantize to exactly the fake-quantized weight
    graph = onnx.load(path).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    codes = inits["layer.weight_quantized"].astype(np.float32)
    scale = inits["layer.weight_scale"].reshape((-1,) + (1,) * (codes.ndim - 1))
    zero = inits["layer.weight_zero_point"].astype(np.float32).reshape(scale.shape)
    qp = model.layer.weight_quant.qparams()
    with torch.no_grad():
        grid = fake_quantize(model.layer.weight, qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.axis).numpy()
        forward = model.layer.weight_quant(model.layer.weight).numpy()
    np.testing.assert_array_equal((codes - zero) * scale, grid)
    # LSQ's forward multiplies its step by grad_scale's x*g + (x - x*g), which can move it by an ulp
    np.testing.assert_allclose((codes - zero) * scale, forward, rtol=1e-6, atol=0)

    verify = verify_onnx(model, path, data())
    assert verify.passed, str(verify)
    assert verify.max_abs_error <= 1e-5 * max(c.output_range for c in verify.checks), str(verify)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", METHODS)
def test_conv_net_matches_onnxruntime(tmp_path, method: str, bits: int) -> None:
    model = conv_net(method, bits)
    path = str(tmp_path / "net.onnx")
    report = export_onnx(model, torch.randn(2, 3, 12, 12), path)

    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert [r.layer for r in report.layers] == ["c1", "c2", "c3", "head"]
    weight_type, signed_type, unsigned_type = (INT4, INT4, UINT4) if bits <= 4 else (INT8, INT8, UINT8)
    inits = initializer_types(path)
    for layer in CONV_ACT_SIGNED:
        assert inits[f"{layer}.weight_quantized"] == weight_type
        assert f"{layer}.weight" not in inits  # the float weight is gone
        assert inits[f"{layer}.bias"] == TensorProto.FLOAT
    # one QuantizeLinear per layer input; its zero point type follows the activation's sign
    expected_q = {signed_type if CONV_ACT_SIGNED[k] else unsigned_type for k in CONV_ACT_SIGNED}
    q_types = zero_point_types(path, "QuantizeLinear")
    assert len(q_types) == 4 and set(q_types) == expected_q
    assert report.op_histogram["DequantizeLinear"] == 8  # 4 weights + 4 activations

    # A different batch (dynamic axis). Layer outputs computed in a different float order can,
    # rarely, land on the other side of the next quantizer's rounding tie; `passed` allows 0.1%.
    verify = verify_onnx(model, path, torch.randn(8, 3, 12, 12))
    assert verify.passed, str(verify)

    # the graph really quantizes: it is not the float network
    float_model = ConvNet()
    float_model.load_state_dict({k: v for k, v in model.state_dict().items() if "quant" not in k})
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert not torch.allclose(float_model(x), model(x), atol=1e-3)


@pytest.mark.parametrize("method", ["lsq", "n2uq", "minmax"])
def test_token_block_matmul_path(tmp_path, method: str) -> None:
    model = quantized(TokenBlock(), method, 4, {"fc1": True, "fc2": True}, (4, 6, 16))
    path = str(tmp_path / "tokens.onnx")
    report = export_onnx(model, torch.randn(2, 6, 16), path)
    ops = report.op_histogram
    assert ops.get("MatMul", 0) + ops.get("Gemm", 0) == 2
    assert {r.nodes for r in report.layers} == {1}
    verify = verify_onnx(model, path, torch.randn(3, 6, 16))
    assert verify.passed, str(verify)
    assert verify.max_abs_error < 1e-5


def test_narrow_range_gets_a_clip(tmp_path) -> None:
    # 6 bits in INT8: a Clip to the trained range keeps saturation exact; 3 bits in INT4: Max/Min
    for bits, ops in ((6, {"Clip"}), (3, {"Max", "Min"})):
        model = conv_net("minmax", bits)
        path = str(tmp_path / f"net{bits}.onnx")
        report = export_onnx(model, torch.randn(2, 3, 12, 12), path)
        assert ops <= set(report.op_histogram), report.op_histogram
        assert all("clip" in r.act for r in report.layers)
        with torch.no_grad():  # push inputs far outside the trained ranges
            verify = verify_onnx(model, path, 20 * torch.randn(8, 3, 12, 12))
        assert verify.passed, str(verify)


def test_n2uq_staircase_is_exported_exactly(tmp_path) -> None:
    model = conv_net("n2uq", 3)
    with torch.no_grad():  # non-uniform thresholds, as after training
        for name in CONV_ACT_SIGNED:
            aq = getattr(model, name).act_quant
            aq.widths.mul_(torch.rand_like(aq.widths) + 0.5)
    path = str(tmp_path / "n2uq.onnx")
    report = export_onnx(model, torch.randn(2, 3, 12, 12), path)
    assert report.op_histogram["Greater"] == 4 and report.op_histogram["ReduceSum"] == 4
    assert all("N2UQ" in r.act for r in report.layers)
    verify = verify_onnx(model, path, torch.randn(16, 3, 12, 12))
    assert verify.passed, str(verify)


def test_float_model_exports_and_matches(tmp_path) -> None:
    model = ConvNet().eval()
    path = str(tmp_path / "float.onnx")
    report = export_onnx(model, torch.randn(2, 3, 12, 12), path)
    assert report.layers == []
    assert "QuantizeLinear" not in report.op_histogram and "DequantizeLinear" not in report.op_histogram
    verify = verify_onnx(model, path, torch.randn(5, 3, 12, 12))
    assert verify.passed and verify.max_abs_error <= 1e-5, str(verify)


class Branchy(nn.Module):
    """A quantized conv whose ReLU output goes through a standalone quantizer, nested outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.branch_quant = make_quantizer("pact", bits=4, role="act", signed=False)

    def forward(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        y = self.branch_quant(torch.relu(self.conv(x)))
        return {"main": (y, y.mean((2, 3)))}


def branchy() -> nn.Module:
    model = Branchy().train()
    model.conv = quantize_layer(model.conv, "lsq", 4, True)
    model(torch.randn(4, 3, 8, 8))
    return model.eval()


def test_standalone_quantizer_and_nested_outputs(tmp_path) -> None:
    model = branchy()
    path = str(tmp_path / "branchy.onnx")
    report = export_onnx(model, torch.randn(2, 3, 8, 8), path, output_names=["y", "pooled"])
    assert [r.layer for r in report.layers] == ["conv", "branch_quant"]
    assert report.op_histogram["QuantizeLinear"] == 2
    verify = verify_onnx(model, path, torch.randn(3, 3, 8, 8))
    graph_as_written = [c for c in verify.checks if c.level == "ORT_DISABLE_ALL"]
    assert [c.output for c in graph_as_written] == ["y", "pooled"]
    assert max(c.max_abs_error for c in graph_as_written) < 1e-5, str(verify)


def test_bias_on_the_int32_grid_survives_onnxruntime_bias_rounding(tmp_path) -> None:
    # Conv -> Relu -> QuantizeLinear: onnxruntime's optimizer rounds the float bias to int32 at
    # scale s_x * s_w. Quantized layers hold their bias on exactly that grid, so every level matches.
    model = branchy()
    with torch.no_grad():  # a bias far off the grid, as BatchNorm folding leaves it
        model.conv.bias.add_(0.123456)
    path = str(tmp_path / "branchy.onnx")
    report = export_onnx(model, torch.randn(2, 3, 8, 8), path)
    assert not any("onnxruntime" in n for n in report.notes), report.notes
    step = model.conv.act_quant.qparams().scale * model.conv.weight_quant.qparams().scale
    bias = model.conv._quant_bias()
    assert torch.allclose(bias / step, torch.round(bias / step), atol=1e-3)
    verify = verify_onnx(model, path, torch.randn(8, 3, 8, 8))
    assert verify.passed and verify.max_abs_error < 1e-5, str(verify)


def test_disabled_quantizer_stays_float_and_is_reported(tmp_path) -> None:
    model = conv_net("lsq", 4)
    model.c2.act_quant.enabled = False
    path = str(tmp_path / "partial.onnx")
    report = export_onnx(model, torch.randn(2, 3, 12, 12), path)
    assert report.op_histogram["QuantizeLinear"] == 3
    assert any("c2.act_quant" in n for n in report.notes)
    assert verify_onnx(model, path, torch.randn(4, 3, 12, 12)).passed


def test_int4_after_relu_survives_onnxruntime_fusions(tmp_path) -> None:
    # onnxruntime's ReluQuantFusion drops a Relu before any non-8-bit QuantizeLinear; with a signed
    # INT4 grid (zero point 0, not -8) that would let negative values through. The export guards it.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model[3] = quantize_layer(model[3], "lsq", 4, True)
    model.train()
    model(torch.randn(4, 3, 8, 8))
    model.eval()
    path = str(tmp_path / "relu.onnx")
    report = export_onnx(model, torch.randn(2, 3, 8, 8), path)
    assert report.op_histogram["Max"] == 1 and report.op_histogram["Relu"] == 1
    verify = verify_onnx(model, path, torch.randn(4, 3, 8, 8))
    assert verify.passed and verify.exact and verify.max_abs_error < 1e-5, str(verify)


def test_zoo_resnet_exports_exactly(tmp_path) -> None:
    from fxfusion import zoo

    model = zoo.build("resnet")
    for name, m in list(model.named_modules()):
        if type(m) in (nn.Conv2d, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_layer(m, "lsq", 4, True))
    (x,) = zoo.example_inputs("resnet")
    model.train()
    model(x)
    model.eval()
    path = str(tmp_path / "resnet.onnx")
    report = export_onnx(model, x, path)
    assert len(report.layers) == 21
    verify = verify_onnx(model, path, x)
    assert verify.passed and verify.exact, str(verify)
    assert len(verify.quantizers) == 21 and all(q.end_to_end_mismatch == 0 for q in verify.quantizers)


# --------------------------------------------------------------------------- reports


def test_reports_print_and_serialise(tmp_path) -> None:
    model = conv_net("pact", 4)
    path = str(tmp_path / "net.onnx")
    report = export_onnx(model, torch.randn(2, 3, 12, 12), path)
    text = str(report)
    assert "c2" in text and "UINT4" in text and "opset 21" in text
    data = json.loads(dumps(report))
    assert data["file_size"] == os.path.getsize(path) > 0
    assert data["num_nodes"] == sum(data["op_histogram"].values())
    c2 = next(r for r in data["layers"] if r["layer"] == "c2")
    assert (c2["weight_bits"], c2["weight_type"], c2["act_bits"], c2["act_type"]) == (4, "INT4", 4, "UINT4")
    assert report.export_time_s > 0

    verify = verify_onnx(model, path, torch.randn(4, 3, 12, 12))
    assert {c.level for c in verify.checks} == {"ORT_DISABLE_ALL", "ORT_ENABLE_ALL"}
    assert "PASSED" in str(verify)
    assert json.loads(dumps(verify))["passed"] is True


def test_verify_detects_a_wrong_quantizer(tmp_path) -> None:
    model = conv_net("lsq", 4)
    path = str(tmp_path / "net.onnx")
    export_onnx(model, torch.randn(2, 3, 12, 12), path)
    proto = onnx.load(path)
    for t in proto.graph.initializer:
        if t.name == "c2.act_scale":
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 1.5, t.name))
    onnx.save(proto, path)
    verify = verify_onnx(model, path, torch.randn(4, 3, 12, 12))
    assert not verify.exact  # the outputs may still pass: the 4-bit head absorbs small changes
    assert [q.layer for q in verify.quantizers if q.local_mismatch > 0] == ["c2"]
    assert "exact on their own inputs: NO" in str(verify)


@pytest.mark.parametrize("layer", ["c1", "c2", "head"], ids=["before", "between", "after"])
def test_verify_detects_a_wrong_model(tmp_path, layer) -> None:
    # A wrong op before, between or after the quantizers: the codes-held-equal check must not excuse it.
    model = conv_net("lsq", 4)
    path = str(tmp_path / "net.onnx")
    export_onnx(model, torch.randn(2, 3, 12, 12), path)
    with torch.no_grad():
        getattr(model, layer).bias.add_(1.0)
    verify = verify_onnx(model, path, torch.randn(4, 3, 12, 12))
    assert not verify.passed and not verify.tie_flips_only and "FAILED" in str(verify)
    assert verify.exact  # every quantizer still reproduces onnxruntime's codes on its own input


def test_verify_leaves_no_hooks_when_a_quantizer_is_not_in_the_graph(tmp_path) -> None:
    # The last quantizer's DequantizeLinear is renamed, so its codes cannot be held equal and the
    # forced check is skipped. The hooks that replace quantizer outputs with onnxruntime's must not
    # stay on the model's other quantizers.
    model = conv_net("lsq", 4)
    path = str(tmp_path / "net.onnx")
    export_onnx(model, torch.randn(2, 3, 12, 12), path)
    proto = onnx.load(path)
    next(n for n in proto.graph.node if n.name == "head/act/DequantizeLinear").name = "renamed"
    onnx.save(proto, path)
    quantizers = [m.act_quant for m in (model.c1, model.c2, model.c3, model.head)]
    assert all(not q._forward_hooks for q in quantizers)
    x, other = torch.randn(4, 3, 12, 12), torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        before = model(other)

    verify = verify_onnx(model, path, x)
    assert [q.layer for q in verify.quantizers] == ["c1", "c2", "c3"]
    assert any(n.startswith("head: its codes could not be held equal") for n in verify.notes), verify.notes
    assert not verify.forced
    assert [dict(q._forward_hooks) for q in quantizers] == [{}] * 4
    with torch.no_grad():  # a leftover hook would put onnxruntime's codes for `x` in place of these
        torch.testing.assert_close(model(other), before, rtol=0, atol=0)


# --------------------------------------------------------------------------- errors


def test_model_with_gabfusion_is_refused(tmp_path) -> None:
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fuse = GABFusion("add", 2, dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fuse(x, x)

    path = tmp_path / "fused.onnx"
    with pytest.raises(ValueError, match=r"fuse.*fxfusion\.deploy\(model, calib_data\)"):
        export_onnx(Fused(), torch.randn(1, 4, 2, 2), path)
    assert not path.exists()


def test_explicit_site_kept_by_deploy_is_exported(tmp_path) -> None:
    class Site(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fuse = GABFusion("add", 2, dim=1, channels=4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.head(self.fuse(y, nn.functional.silu(y)))

    model = Site()
    model.head = quantize_layer(model.head, "lsq", 4, True)
    model.train()
    model(torch.randn(2, 3, 6, 6))
    model.eval()
    path = tmp_path / "site.onnx"
    with pytest.raises(ValueError, match="not deployed"):  # a training site
        export_onnx(model, torch.randn(2, 3, 6, 6), path)

    # what deploy leaves at a site it cannot fold: fixed branch scales and a shift
    model.fuse = DeployedFusion.from_training(model.fuse, torch.rand(4) + 0.5, torch.randn(4))
    report = export_onnx(model, torch.randn(2, 3, 6, 6), path)
    assert any(n.startswith("fuse: GABFusion site kept by deploy") for n in report.notes)
    verify = verify_onnx(model, path, torch.randn(3, 3, 6, 6))
    assert verify.passed and verify.exact and verify.max_abs_error < 1e-5, str(verify)


def test_low_bits_need_opset_21_and_eight_bits_do_not(tmp_path) -> None:
    with pytest.raises(ValueError, match="opset >= 21"):
        export_onnx(conv_net("lsq", 4), torch.randn(2, 3, 12, 12), tmp_path / "a.onnx", opset=17)
    model = conv_net("minmax", 8)
    path = str(tmp_path / "b.onnx")
    report = export_onnx(model, torch.randn(2, 3, 12, 12), path, opset=17)
    assert report.opset == 17 and onnx.load(path).opset_import[0].version == 17
    assert verify_onnx(model, path, torch.randn(4, 3, 12, 12)).passed
    with pytest.raises(ValueError, match="opset=9"):
        export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "c.onnx", opset=9)


def test_unsupported_op_names_op_and_module(tmp_path) -> None:
    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.fft2(self.conv(x)).real

    model = nn.Sequential(nn.ReLU(), Spectral())
    path = tmp_path / "fft.onnx"
    with pytest.raises(OnnxExportError, match=r"aten::fft_fft2 in module '1'.*register_custom_op_symbolic"):
        export_onnx(model, torch.randn(1, 3, 4, 4), path)
    assert not path.exists()


def test_uninitialized_quantizer_is_named(tmp_path) -> None:
    model = ConvNet()
    model.c1 = quantize_layer(model.c1, "lsq", 4, True)
    with pytest.raises(ValueError, match=r"c1\.weight_quant.*forward pass"):
        export_onnx(model.eval(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")


def test_export_does_not_touch_the_model(tmp_path) -> None:
    model = conv_net("dsq", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "net.onnx")
    assert model.training and model.c1.act_quant.enabled
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert os.path.getsize(tmp_path / "net.onnx") > 0


@pytest.mark.parametrize("dtype, lo, hi", [(TensorProto.INT4, -8, 7), (TensorProto.UINT4, 0, 15),
                                           (TensorProto.INT8, -128, 127), (TensorProto.UINT8, 0, 255)])
@pytest.mark.parametrize("shape", [(), (1,), (5,), (3, 1, 1, 1), (6, 3, 3, 3)])
def test_integer_initializers_are_raw_data_that_reads_back_as_the_codes(dtype, lo, hi, shape) -> None:
    """Codes are written as packed raw bytes (two per byte for 4 bits, odd counts padded), not Python lists."""
    from fxfusion.passes.onnx_qdq import _raw_codes

    codes = np.random.default_rng(0).integers(lo, hi + 1, size=shape)
    codes.flat[0] = lo  # both ends of the range, sign nibble included
    codes.flat[-1] = hi
    tensor = onnx.helper.make_tensor("w", dtype, codes.shape, _raw_codes(codes, dtype), raw=True)
    packed = dtype in (TensorProto.INT4, TensorProto.UINT4)
    assert len(tensor.raw_data) == ((codes.size + 1) // 2 if packed else codes.size)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor).astype(np.int64), codes)
