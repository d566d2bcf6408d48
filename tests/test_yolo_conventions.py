"""Models that leave quantize and deploy keep working with YOLO-style tools (no ultralytics needed).

The YOLO block convention (YOLOv5, Ultralytics): a ``Conv`` block has ``conv``, ``bn``, ``act`` and
a ``forward_fuse``; the framework's ``fuse()`` folds ``bn``, deletes it and sets ``forward =
forward_fuse``, and it fails on a block whose ``bn`` is anything but a BatchNorm. A frozen conv
(Ultralytics' DFL, fixed weights 0..15) must stay float.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import fxfusion
from fxfusion.passes.trace import trace_units
from fxfusion.quant.layers import is_quantized


class Conv(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = Conv(3, 8), Conv(3, 8), Conv(16, 8)
        self.dfl = nn.Conv2d(8, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(8.0).view(1, 8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dfl(self.c(torch.cat([self.a(x), self.b(x)], 1)))

    def fuse(self) -> Net:
        """What Ultralytics' BaseModel.fuse() does to its Conv blocks."""
        for m in self.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_bn_eval(m.conv, m.bn)  # raises on an nn.Identity 'bn'
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self


def _trained_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)


@pytest.fixture
def qat(x: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = fxfusion.rewrite(_trained_net(), x, fold="any")
    return fxfusion.quantize(rewritten, x, method="lsq", w_bits=4, a_bits=4).eval()


def test_a_folded_bn_leaves_the_blocks_fused_form(qat: nn.Module) -> None:
    for block in (qat.a, qat.b, qat.c):
        assert not hasattr(block, "bn")
        assert block.forward == block.forward_fuse
        assert is_quantized(block.conv)


def test_the_frameworks_fuse_leaves_the_quantized_model_as_it_is(qat: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        before = qat(x)
        qat.fuse()
        after = qat(x)
    assert torch.equal(before, after)
    assert all(is_quantized(b.conv) for b in (qat.a, qat.b, qat.c))


def test_the_fold_into_the_fused_form_computes_the_float_model(x: torch.Tensor) -> None:
    """The fold itself (before any quantizer) computes the float model."""
    net = _trained_net()
    from fxfusion.passes.quantize import fold_batchnorms

    folded = copy.deepcopy(net)
    fold_batchnorms(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_block_in_its_fused_form_traces_through_the_method_that_runs(qat: nn.Module) -> None:
    assert not trace_units(qat).untraceable
    (unit,) = trace_units(qat.a).units  # traced on its own: torch.fx would read type(a).forward and its bn
    assert [n.target for n in unit.graph_module.graph.nodes if n.op == "call_module"] == ["conv", "act"]


def test_fused_form_survives_deepcopy_and_pickle(qat: nn.Module, x: torch.Tensor) -> None:
    twin = copy.deepcopy(qat)
    assert twin.a.forward.__self__ is twin.a
    buf = io.BytesIO()
    torch.save(qat, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), qat(x))
        assert torch.equal(twin(x), qat(x))


def test_a_frozen_conv_stays_float_with_its_reason(qat: nn.Module) -> None:
    assert not is_quantized(qat.dfl)
    rows = qat.fxfusion_reports["quantize"].float_layers
    assert [r["layer"] for r in rows] == ["dfl"]
    assert "frozen" in rows[0]["reason"]


def test_deploy_takes_one_batch_tensor_as_its_calibration_data(qat: nn.Module, x: torch.Tensor) -> None:
    deployed = fxfusion.deploy(qat, x, progress=False)
    assert deployed.fxfusion_reports["deploy"].output_deviation["batches"] == 1
    with torch.no_grad():
        assert deployed(x).shape == (2, 1, 16, 16)


# --- a framework's wrapper object -------------------------------------------------------------

def _wrapper_class() -> type:
    """A class that looks to fxfusion like Ultralytics' ``Model`` (YOLO's base), without Ultralytics."""
    return type("Model", (nn.Module,), {"__module__": "ultralytics.engine.model"})


def test_a_framework_wrapper_is_read_through_and_refused_with_directions(x: torch.Tensor) -> None:
    wrapper = _wrapper_class()()
    wrapper.model = _trained_net()
    assert len(fxfusion.find_fusions(wrapper, x).sites) == len(fxfusion.find_fusions(wrapper.model, x).sites) == 1
    for edit in (fxfusion.rewrite, fxfusion.quantize):
        with pytest.raises(TypeError, match=r"yolo.model = fxfusion\.\w+\(yolo.model.*yolo.train\(\) rebuilds"):
            edit(wrapper, x)


# --- export for a runtime that reads metadata and symbolic shapes ------------------------------

def test_export_writes_metadata_and_extra_symbolic_axes(qat: nn.Module, x: torch.Tensor, tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    deployed = fxfusion.deploy(qat, x, progress=False)
    path = tmp_path / "m.onnx"
    fxfusion.export_onnx(deployed, x, path, input_names=["images"], output_names=["out"],
                         dynamic_axes={"images": {2: "height", 3: "width"}, "out": {2: "h", 3: "w"}},
                         metadata={"names": {0: "a"}, "stride": 1})
    proto = onnx.load(path)
    assert {p.key: p.value for p in proto.metadata_props} == {"names": "{0: 'a'}", "stride": "1"}
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    bigger = torch.randn(3, 3, 24, 20)
    (y,) = session.run(None, {"images": bigger.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), deployed(bigger), rtol=0, atol=1e-3)


def test_export_refuses_dynamic_axes_of_an_unknown_name(qat: nn.Module, x: torch.Tensor, tmp_path) -> None:
    deployed = fxfusion.deploy(qat, x, progress=False)
    with pytest.raises(ValueError, match="dynamic_axes names 'image'"):
        fxfusion.export_onnx(deployed, x, tmp_path / "m.onnx", dynamic_axes={"image": {2: "h"}})
    assert not (tmp_path / "m.onnx").exists()
