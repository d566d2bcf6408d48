"""The deploy issue's acceptance: rewrite → quantize → 20 QAT steps → deploy → export_onnx.

On the YOLOv5-style (its Concat/C3/SPPF cats, where the paper places GABFusion), U-Net,
ResNet, DenseNet and transformer zoo models: no LayerNorm and no leftover scale op in the
ONNX graph, the same node count as the model quantized without rewrite, and onnxruntime
equal to the deployed PyTorch model.
"""

from __future__ import annotations

import warnings
from collections import Counter

import onnx
import pytest
import torch

import fxfusion
from fxfusion.passes.runtime import leaves
from fxfusion.zoo import example_inputs

MODELS = {"yolov5": ["cat"], "unet": None, "resnet": None, "densenet": None, "transformer": None}


def _qat(model, x, rewrite: bool, ops=None, method="lsq", bits=4, steps=20, init="preserve"):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if rewrite:
            model = fxfusion.rewrite(model, x, sites=fxfusion.find_fusions(model, x, ops=ops), init=init)
        model = fxfusion.quantize(model, x, method=method, w_bits=bits, a_bits=bits)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for i in range(steps):
        xb = example_inputs_like(x, seed=i)
        out = [t for t in leaves(model(*xb)) if isinstance(t, torch.Tensor)]
        loss = sum(t.float().pow(2).mean() for t in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def example_inputs_like(x, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return tuple(torch.randn(t.shape, generator=g) for t in x)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(path).graph.node)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deployed_model_exports_with_the_original_topology(zoo_model, name, tmp_path):
    model, x = zoo_model(name)
    calib = [example_inputs(name, seed=s) for s in range(4)]

    baseline = _qat(model, x, rewrite=False)
    baseline.eval()
    base_path = str(tmp_path / "baseline.onnx")
    fxfusion.export_onnx(baseline, x, base_path)

    # The transformer's residual adds feed LayerNorms, which absorb only a channel-uniform affine:
    # the paper's form gives one ("ln" statistics); the preserve form's trained per-channel γ does not.
    qat = _qat(model, x, rewrite=True, ops=MODELS[name], init="paper" if name == "transformer" else "preserve")
    deployed = fxfusion.deploy(qat, calib, progress=False)
    report = deployed.fxfusion_reports["deploy"]
    assert all(s["target"] != "explicit per-channel op" for s in report.sites), str(report)
    deployed.eval()
    path = str(tmp_path / "deployed.onnx")
    fxfusion.export_onnx(deployed, x, path)

    ops, base_ops = _ops(path), _ops(base_path)
    # no GABFusion LayerNorm is left (the transformer's own LayerNorms stay)
    assert ops["LayerNormalization"] == base_ops["LayerNormalization"] and ops["ReduceMean"] == base_ops["ReduceMean"]
    assert sum(ops.values()) == sum(base_ops.values()), (ops - base_ops, base_ops - ops)
    assert ops == base_ops  # same ops, so no Mul/Add scale op was left behind

    verify = fxfusion.verify_onnx(deployed, path, example_inputs(name, seed=99))
    assert verify.passed, str(verify)


@pytest.mark.parametrize("method", ["lsq", "pact", "dsq", "n2uq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_quantizer_and_bit_width_exports_on_resnet(request, zoo_model, method, bits, tmp_path):
    if (method, bits) == ("pact", 2):
        # Found when the default rewrite became function-preserving (the same happens without any rewrite):
        # three SGD steps at lr 1e-3 drive PACT's 2-bit clip alpha of layer2.0.conv2's input to -250, its
        # scale clamps to 1e-8, and onnxruntime's codes then differ. PACT's alpha needs a gradient scale or a
        # positive floor, as N2UQ got.
        request.applymarker(pytest.mark.xfail(strict=True, reason="PACT 2-bit clip collapses below 0"))
    model, x = zoo_model("resnet")
    qat = _qat(model, x, rewrite=True, method=method, bits=bits, steps=3)
    deployed = fxfusion.deploy(qat, [example_inputs("resnet", seed=s) for s in range(2)], progress=False)
    deployed.eval()
    path = str(tmp_path / "resnet.onnx")
    report = fxfusion.export_onnx(deployed, x, path)
    assert report.op_histogram.get("QuantizeLinear", 0) > 0
    assert "LayerNormalization" not in report.op_histogram
    verify = fxfusion.verify_onnx(deployed, path, example_inputs("resnet", seed=7))
    assert verify.passed, str(verify)
