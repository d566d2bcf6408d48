"""The eval forward of every uniform quantizer equals onnxruntime's QDQ built from ``qparams()``.

The graph is the one the exporter needs: ``Max``/``Min`` to the grid's float range (needed when
the integer range is narrower than the ONNX type, e.g. 5-bit codes in INT8 or the restricted
weight range), ``QuantizeLinear`` with an INT4/UINT4 zero point (opset 21) for 2-4 bits or INT8/UINT8
for 5-8 bits, then ``DequantizeLinear``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxfusion.quant import QUANTIZERS, QParams, make_quantizer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

METHODS = sorted(QUANTIZERS)
CONFIGS = [("weight", True, 6), ("act", False, None), ("act", True, None)]


def _qdq_model(qp: QParams, shape: tuple[int, ...]) -> bytes:
    if qp.bits <= 4:
        zp_type = TensorProto.INT4 if qp.qmin < 0 else TensorProto.UINT4
    else:
        zp_type = TensorProto.INT8 if qp.qmin < 0 else TensorProto.UINT8
    scale = qp.scale.numpy().astype(np.float32)
    zero_point = qp.zero_point.numpy()
    lo = ((qp.qmin - zero_point) * scale).astype(np.float32)
    hi = ((qp.qmax - zero_point) * scale).astype(np.float32)
    if qp.per_channel:  # Clip takes scalar bounds; Max/Min broadcast per-channel ones
        view = [1] * len(shape)
        view[qp.axis] = -1
        lo, hi = lo.reshape(view), hi.reshape(view)
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, scale.shape, scale.ravel().tolist()),
        helper.make_tensor("zp", zp_type, zero_point.shape, zero_point.ravel().tolist()),
        helper.make_tensor("lo", TensorProto.FLOAT, lo.shape, lo.ravel().tolist()),
        helper.make_tensor("hi", TensorProto.FLOAT, hi.shape, hi.ravel().tolist()),
    ]
    axis = {"axis": qp.axis} if qp.per_channel else {}
    nodes = [
        helper.make_node("Max", ["x", "lo"], ["x_lo"]),
        helper.make_node("Min", ["x_lo", "hi"], ["x_clip"]),
        helper.make_node("QuantizeLinear", ["x_clip", "scale", "zp"], ["q"], **axis),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **axis),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize(("role", "signed", "channels"), CONFIGS, ids=["weight", "act-unsigned", "act-signed"])
@pytest.mark.parametrize("method", METHODS)
def test_eval_forward_equals_onnxruntime_qdq(method, bits, role, signed, channels) -> None:
    if method == "n2uq" and role == "act":
        pytest.skip("N2UQ activations are a threshold staircase, not a QDQ pair")
    q = make_quantizer(method, bits=bits, role=role, signed=signed, channels=channels)
    x = torch.randn(6, 4, 5, 5) * 1.5
    x = x if signed else torch.relu(x)
    q.train()(x)
    q.eval()
    x = x * 1.3 + 0.01 * torch.randn_like(x)
    expected = q(x).detach().numpy()
    session = ort.InferenceSession(_qdq_model(q.qparams(), tuple(x.shape)), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
