"""ONNX graph surgery: real QuantizeLinear/DequantizeLinear nodes in an exported float graph.

torch's own fake-quant export cannot write sub-8-bit grids (``docs/DESIGN.md``, "Facts checked"),
so :func:`fxfusion.passes.export.export_onnx` exports the *float* graph with the legacy
TorchScript exporter (``export_trace``: every quantizer disabled, no constant folding, so
initializers keep their parameter names), and this module inserts the quantization by editing
that graph. For every enabled quantized layer at module path ``P``::

    before:  x ─────────────────────────────▶ Conv/Gemm/MatMul ◀── P.weight (float)
    after:   x ─[Clip]─▶ QuantizeLinear ─▶ DequantizeLinear ─▶ Conv/Gemm/MatMul
                                              P.weight ◀── DequantizeLinear(axis=0) ◀── P.weight_quantized (INTn)

Rules (``q`` = ``weight_quant.qparams()`` or ``act_quant.qparams()``):

- **Weight.** The float initializer ``P.weight`` is replaced by the integer codes
  ``clamp(rint(w / s) + zp, qmin, qmax)``, stored as INT4/UINT4 (``bits <= 4``) or INT8/UINT8
  (5..8 bits), signed when ``qmin < 0``; a ``DequantizeLinear`` (``axis=0`` when per channel)
  whose output is named ``P.weight`` feeds the unchanged consumers (Conv, Gemm with ``transB``,
  or the Transpose in front of a MatMul). ``(code - zp) * s`` is exactly the fake-quantized weight.
- **Input activation.** On the layer's activation input only (the other data input of each node
  that consumes ``P.weight``), ``QuantizeLinear -> DequantizeLinear`` with a zero point of the same
  4- or 8-bit type. When ``[qmin, qmax]`` is narrower than the type (3 bits in INT4, 6 bits in
  INT8, a restricted symmetric range), a clip to ``[(qmin - zp) s, (qmax - zp) s]`` comes first:
  then ``rint(clip(x) / s) + zp`` equals ``clamp(rint(x / s) + zp, qmin, qmax)`` for every ``x``.
  The clip is a ``Clip`` for 8-bit types and ``Max -> Min`` for 4-bit types (onnxruntime 1.32's
  Clip/QuantizeLinear fusion throws on 4-bit zero points) and per-channel grids.
- **Guards against onnxruntime's optimizer** (4-bit types only; ``_guard_reason``). An unclipped
  4-bit QuantizeLinear gets a lone ``Max`` to the grid's lower end in front, a no-op before the
  saturating QuantizeLinear, which no fusion looks through, when

  - its zero point is not the type's minimum and it reads a Relu (through Identity, Dropout and
    the arithmetic ops NoopElimination may drop first): ReluQuantFusion would delete that Relu,
    which it does for every non-8-bit zero point without checking it;
  - it reads a ``Clip`` (ReLU6, Hardtanh): ClipQuantFusion throws on the 4-bit zero point and the
    session fails to initialize (torchvision MobileNetV2);
  - it reads the output of a Conv/Gemm whose weights are 5..8-bit (through a Relu): the QDQ fusion
    would build a QLinearConv of 4-bit activations and 8-bit weights, which has no kernel;
  - it reads a MaxPool, Reshape, Transpose, Squeeze, Unsqueeze or Slice: QDQPropagationTransformer
    would move it in front of that op (a Q/DQ pair on ``<input>_q_to_dq``) and DropQDQNodes would
    run the op on int4. A MaxPool has no int4 kernel, so the session is refused (GoogLeNet,
    SqueezeNet); the others put the QuantizeLinear behind a Relu that ReluQuantFusion deletes.

  A standalone quantizer whose 4-bit DequantizeLinear feeds one of those ops gets a ``Max`` after
  it for the same reason (propagation moves a DequantizeLinear forward). Identity nodes are looked
  through, since onnxruntime removes them first. ``docs/DESIGN.md`` ("Facts checked") has the
  evidence; ``tests/test_export_real_patterns.py`` loads each case at every optimization level.
- **N2UQ activation** (``q.thresholds`` set): the staircase ``code = qmin + #{k : x > t_k}`` is
  ``Unsqueeze(x, -1) > thresholds -> Cast -> ReduceSum(-1) [-> Add qmin]``, then
  ``QuantizeLinear(code, 1, 0) -> DequantizeLinear(scale, zp)`` carries it on the integer type.
  Exact: only comparisons, a sum of small integers and one multiplication.
- **Bias** stays float. onnxruntime's optimizer (``ORT_ENABLE_BASIC`` and above) rounds the bias of
  a Conv/Gemm whose output goes straight to a QuantizeLinear to int32 at scale ``s_x s_w``; when
  the PyTorch bias is not on that grid, the report says so for that layer.
- **A quantizer outside a quantized layer** (e.g. on a branch) is exported with the same
  activation rules at its own place in the graph: it is traced as a placeholder node, then
  replaced.

``export_onnx`` then checks the result (``onnx.checker``, an onnxruntime session) before it
writes the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fxfusion.passes.export_plan import _Plan
from fxfusion.passes.export_records import LayerExport, OnnxExportError
from fxfusion.passes.export_trace import _MARKER_DOMAIN
from fxfusion.quant.base import QParams

__all__ = ["activation_prefix"]


_ONNX_TYPES = {  # (bits <= 4, signed) -> type, its range
    (True, True): (TensorProto.INT4, -8, 7),
    (True, False): (TensorProto.UINT4, 0, 15),
    (False, True): (TensorProto.INT8, -128, 127),
    (False, False): (TensorProto.UINT8, 0, 255),
}


def _int_type(qp: QParams, where: str) -> tuple[int, int, int]:
    dtype, lo, hi = _ONNX_TYPES[(qp.bits <= 4, qp.qmin < 0)]
    zp = qp.zero_point
    if qp.qmin < lo or qp.qmax > hi or int(zp.min()) < lo or int(zp.max()) > hi:
        raise ValueError(
            f"{where}: the grid [{qp.qmin}, {qp.qmax}] (zero point {zp.tolist()}) does not fit "
            f"{TensorProto.DataType.Name(dtype)} [{lo}, {hi}] for bits={qp.bits}; the quantizer's "
            f"qparams() is inconsistent with its bit width"
        )
    return dtype, lo, hi


class _Surgery:
    """Edits a graph: new initializers, new nodes placed before their first consumer."""

    def __init__(self, graph: onnx.GraphProto, weight_bits: dict[str, int] | None = None) -> None:
        self.graph = graph
        self.weight_bits = weight_bits or {}  # "<layer>.weight" -> bits of its quantized weight
        self.inits = {t.name: t for t in graph.initializer}
        self.taken = set(self.inits) | {i.name for i in graph.input} | {o.name for o in graph.output}
        for n in graph.node:
            self.taken.update(n.input)
            self.taken.update(n.output)
        for n in graph.node:  # nodes are keyed by name below: make names unique
            n.name = self.name(n.name or f"/{n.op_type}")
        self._producer = {o: n for n in graph.node for o in n.output}  # the traced graph's own nodes
        self._consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # in graph order; see rewire
        for n in graph.node:
            for i, v in enumerate(n.input):
                self._consumers.setdefault(v, []).append((n, i))
        self.first: list[onnx.NodeProto] = []  # nodes that read only initializers
        self.before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to place before it
        self.replace: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to place instead
        self.pending: list[onnx.NodeProto] = []  # the chain being built
        self.dropped: set[str] = set()  # initializers replaced by their integer form

    def name(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def producer(self, value: str, through: tuple[str, ...] = ("Identity",)) -> onnx.NodeProto | None:
        """The original graph node that computes ``value``, looking through the ops in ``through``;
        None for a graph input or initializer.

        A unary op is looked through to its first input. A binary arithmetic op (``_ARITHMETIC``) is
        looked through only when all its inputs but one are constants (what NoopElimination can
        drop): an add of two branches is a producer in its own right.
        """
        node = self._producer.get(value)
        while node is not None and node.op_type in through:
            inputs = [v for v in node.input if v] if node.op_type in _ARITHMETIC else node.input[:1]
            computed = [v for v in inputs if not self.constant(v)]
            if len(computed) != 1:
                break
            node = self._producer.get(computed[0])
        return node

    def constant(self, value: str) -> bool:
        """Whether ``value`` is an initializer or a Constant node's output."""
        node = self._producer.get(value)
        return value in self.inits or (node is not None and node.op_type == "Constant")

    def producer_op(self, value: str, through: tuple[str, ...] = ("Identity",)) -> str:
        """The op type of :meth:`producer` ("" for a graph input or initializer)."""
        node = self.producer(value, through)
        return node.op_type if node is not None else ""

    def consumer_ops(self, value: str) -> set[str]:
        """The op types of the graph nodes that read ``value``, looking through Identity."""
        ops: set[str] = set()
        for node, _ in self._consumers.get(value, []):
            ops |= self.consumer_ops(node.output[0]) if node.op_type == "Identity" else {node.op_type}
        return ops

    def consumers(self, value: str) -> list[tuple[onnx.NodeProto, int]]:
        """(node, input index) of every graph node that reads ``value``, in graph order."""
        return list(self._consumers.get(value, []))

    def rewire(self, node: onnx.NodeProto, index: int, value: str) -> None:
        """Make input ``index`` of the graph node ``node`` read ``value`` (keeps :meth:`consumers` exact)."""
        old = self._consumers[node.input[index]]
        kept = [(n, i) for n, i in old if not (n is node and i == index)]
        assert len(kept) == len(old) - 1, "rewire takes a node returned by consumers()"
        old[:] = kept
        self._consumers.setdefault(value, []).append((node, index))
        node.input[index] = value

    def initializer(self, base: str, array: np.ndarray, dtype: int | None = None) -> str:
        name = self.name(base)
        if dtype is not None:
            tensor = helper.make_tensor(name, dtype, array.shape, _raw_codes(array, dtype), raw=True)
        else:
            tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [self.name(f"{base}_{op}_out")], name=self.name(f"{base}/{op}"), **attrs)

    def finish(self) -> None:
        if self.dropped:
            kept = [t for t in self.graph.initializer if t.name not in self.dropped]
            del self.graph.initializer[:]
            self.graph.initializer.extend(kept)
        nodes = list(self.first)
        for n in self.graph.node:
            nodes += self.before.get(n.name, [])
            nodes += self.replace.get(n.name, [n])
        del self.graph.node[:]
        self.graph.node.extend(nodes)


def _raw_codes(array: np.ndarray, dtype: int) -> bytes:
    """Integer codes as ONNX raw data: one byte each for (U)INT8, two per byte for (U)INT4 (the first
    in the low nibble). ``make_tensor`` from a Python list took 0.25 s per million codes, most of
    a ResNet-18 export; this is the same tensor (``numpy_helper.to_array`` reads it back equal)."""
    codes = np.asarray(array).astype(np.int64).ravel()
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        nibbles = (codes & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
    return codes.astype(np.int8 if dtype == TensorProto.INT8 else np.uint8).tobytes()


def _quantize_layer(s: _Surgery, plan: _Plan, ranks: dict[str, int]) -> LayerExport:
    weight_name = f"{plan.name}.weight"
    if weight_name not in s.inits:
        raise OnnxExportError(
            f"{plan.name}: the exported graph has no initializer {weight_name!r} (the weight is shared, "
            f"computed, or renamed by the exporter), so its integer weights cannot be placed; untie the "
            f"weight or keep this layer in float (leave its weight_quant disabled)"
        )
    computes = _compute_nodes(s, plan.name, weight_name)
    row = LayerExport(plan.name, plan.kind)
    if plan.weight is not None:
        row.weight = _quantize_weight(s, plan, weight_name)
        row.weight_bits, row.weight_type = plan.weight.bits, _type_name(plan.weight)
    if plan.act is not None:
        for node, index in computes:
            out, row.act = _activation_chain(
                s, node.input[index], plan.act, plan.name, f"{plan.name}.act_quant", ranks.get(plan.name)
            )
            s.before.setdefault(node.name, []).extend(s.pending)
            s.rewire(node, index, out)
        row.nodes = len(computes)
        row.act_bits, row.act_type = plan.act.bits, _type_name(plan.act)
    return row


def _type_name(qp: QParams) -> str:
    return TensorProto.DataType.Name(_ONNX_TYPES[(qp.bits <= 4, qp.qmin < 0)][0])


def _compute_nodes(s: _Surgery, layer: str, weight: str) -> list[tuple[onnx.NodeProto, int]]:
    """(node, activation input index) for every Conv/Gemm/MatMul that reads the weight."""
    found = []
    for node, index in s.consumers(weight):
        if node.op_type == "Transpose":
            pairs = s.consumers(node.output[0])
        else:
            pairs = [(node, index)]
        for n, i in pairs:
            if n.op_type not in ("Conv", "Gemm", "MatMul") or i > 1:
                raise OnnxExportError(
                    f"{layer}: its weight reaches an ONNX {n.op_type} node ({n.name!r}) instead of "
                    f"Conv/Gemm/MatMul, so the activation input to quantize is unknown; export this "
                    f"layer unquantized or report the pattern"
                )
            found.append((n, 1 - i))
    if not found:
        raise OnnxExportError(f"{layer}: no ONNX node consumes {weight!r}; the layer is unused in forward")
    return found


def _quantize_weight(s: _Surgery, plan: _Plan, weight_name: str) -> str:
    qp, where = plan.weight, f"{plan.name}.weight_quant"
    dtype, _, _ = _int_type(qp, where)
    float_init = s.inits.pop(weight_name)
    s.dropped.add(weight_name)  # taken out of the graph in finish(): one pass, not a list scan per weight
    w = torch.from_numpy(numpy_helper.to_array(float_init).copy())
    scale = qp.scale.to(w.dtype)
    zero_point = qp.zero_point.to(w.dtype)
    if qp.per_channel:
        if scale.numel() != w.shape[0]:
            raise ValueError(f"{where}: {scale.numel()} scales for a weight with {w.shape[0]} output channels")
        shape = (-1,) + (1,) * (w.dim() - 1)
        scale_b, zero_b = scale.reshape(shape), zero_point.reshape(shape)
    else:
        scale_b, zero_b = scale, zero_point
    codes = torch.clamp(torch.round(w / scale_b) + zero_b, qp.qmin, qp.qmax).to(torch.int64).numpy()
    inputs = [
        s.initializer(f"{weight_name}_quantized", codes, dtype),
        s.initializer(f"{weight_name}_scale", scale.numpy()),
        s.initializer(f"{weight_name}_zero_point", qp.zero_point.numpy(), dtype),
    ]
    attrs = {"axis": 0} if qp.per_channel else {}
    s.taken.discard(weight_name)
    s.first.append(
        helper.make_node("DequantizeLinear", inputs, [weight_name], name=s.name(f"{plan.name}/weight/DQ"), **attrs)
    )
    granularity = f"per-channel({scale.numel()})" if qp.per_channel else "per-tensor"
    return f"{TensorProto.DataType.Name(dtype)} {qp.bits}b [{qp.qmin},{qp.qmax}] {granularity}"


def _activation_chain(s: _Surgery, value: str, qp: QParams, base: str, where: str, rank: int | None) -> tuple[str, str]:
    """Nodes (left in ``s.pending``) that quantize ``value``; returns (output name, description)."""
    dtype, lo, hi = _int_type(qp, where)
    type_name = TensorProto.DataType.Name(dtype)
    s.pending = []
    if qp.thresholds is not None:
        return _staircase(s, value, qp, base, dtype, where), f"{type_name} {qp.bits}b N2UQ thresholds (exact)"

    axis_attrs: dict[str, int] = {}
    scale = qp.scale.float().numpy()
    zero_point = qp.zero_point.numpy()
    if qp.per_channel:
        if rank is None:
            raise ValueError(f"{where}: per-channel activation quantizer never ran; cannot place its axis")
        axis_attrs = {"axis": qp.axis % rank}
    x = value
    clipped = qp.qmin > lo or qp.qmax < hi
    # A 4-bit QuantizeLinear must not sit right behind an op that onnxruntime fuses into it or moves
    # it across (_guard_reason); a Max to the grid's lower end (a no-op before the saturating
    # QuantizeLinear) keeps them apart. A clipped grid already starts with a Max.
    guarded = not clipped and dtype in (TensorProto.INT4, TensorProto.UINT4) and bool(_guard_reason(s, value, qp, lo))
    if clipped or guarded:
        low, high = _grid_ends(qp, rank)
        if guarded:
            x = _emit(s, "Max", [x, s.initializer(f"{base}.act_clip_min", low)], base)
        elif qp.per_channel or qp.bits <= 4:
            # Clip takes scalar bounds only, and onnxruntime 1.32's Clip->QuantizeLinear fusion
            # throws on 4-bit zero points ("Unexpected data type ... y_zero_point"): Max, Min.
            x = _emit(s, "Max", [x, s.initializer(f"{base}.act_clip_min", low)], base)
            x = _emit(s, "Min", [x, s.initializer(f"{base}.act_clip_max", high)], base)
        else:
            x = _emit(
                s,
                "Clip",
                [x, s.initializer(f"{base}.act_clip_min", low), s.initializer(f"{base}.act_clip_max", high)],
                base,
            )
    scale_name = s.initializer(f"{base}.act_scale", scale)
    zp_name = s.initializer(f"{base}.act_zero_point", zero_point, dtype)
    q = _emit(s, "QuantizeLinear", [x, scale_name, zp_name], base, **axis_attrs)
    out = _emit(s, "DequantizeLinear", [q, scale_name, zp_name], base, **axis_attrs)
    clip = f" clip[{qp.qmin},{qp.qmax}]" if clipped else ""
    granularity = "per-channel" if qp.per_channel else "per-tensor"
    return out, f"{type_name} {qp.bits}b{clip} {granularity}"


# Ops across which onnxruntime's QDQPropagationTransformer (ORT_ENABLE_EXTENDED) moves a
# QuantizeLinear backward (and a DequantizeLinear forward); its DropQDQNodes rule then runs the op
# on the integer tensor. MaxPool has no int4/uint4 type, so the session is refused; for the others
# the moved QuantizeLinear lands behind a Relu that ReluQuantFusion then deletes.
_QDQ_PROPAGATING = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})


_ARITHMETIC = ("Add", "Sub", "Mul", "Div")
_REMOVABLE = ("Identity", "Dropout", *_ARITHMETIC)  # may vanish before ReluQuantFusion runs


def _guard_reason(s: _Surgery, value: str, qp: QParams, type_min: int) -> str:
    """Why a 4-bit QuantizeLinear of ``value`` needs a no-op Max in front ("" when it does not).

    - A zero point above the type's minimum and a Relu in front: ReluQuantFusion deletes that Relu
      without checking the zero point, which is only right at the minimum. The Relu is looked for
      through the ops onnxruntime may remove before that fusion runs (Identity, Dropout, and
      Add/Sub/Mul/Div, which NoopElimination drops when their constant is neutral).
    - ``Clip`` (ReLU6, Hardtanh) in front: ClipQuantFusion throws on a 4-bit zero point, so the
      session fails to initialize.
    - MaxPool, Reshape, Transpose, Squeeze, Unsqueeze or Slice in front: see ``_QDQ_PROPAGATING``.
    - A Conv/Gemm with 5..8-bit (INT8-typed) weights in front, through a Relu: onnxruntime's QDQ
      fusion would build a QLinearConv of a 4-bit input and output and 8-bit weights, which has no
      kernel, and the session is refused.

    The producer is looked up through Identity nodes, which onnxruntime removes first. Guarding
    does not depend on how many nodes read ``value``: fusions can merge readers.
    """
    if bool((qp.zero_point != type_min).any()) and s.producer_op(value, _REMOVABLE) == "Relu":
        return "ReluQuantFusion"
    layer = s.producer(value, ("Identity", "Relu"))
    if layer is not None and layer.op_type in ("Conv", "Gemm") and len(layer.input) > 1 \
            and s.weight_bits.get(layer.input[1], 0) > 4:
        return "QLinearConv"
    op = s.producer_op(value)
    return op if op == "Clip" or op in _QDQ_PROPAGATING else ""


def _grid_ends(qp: QParams, rank: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The float values of the grid's ends, ``(qmin - zp) s`` and ``(qmax - zp) s``, shaped to broadcast."""
    low = ((qp.qmin - qp.zero_point.float()) * qp.scale.float()).numpy()
    high = ((qp.qmax - qp.zero_point.float()) * qp.scale.float()).numpy()
    if qp.per_channel:
        shape = [1] * rank
        shape[qp.axis % rank] = -1
        low, high = low.reshape(shape), high.reshape(shape)
    return low, high


def _staircase(s: _Surgery, value: str, qp: QParams, base: str, dtype: int, where: str) -> str:
    if qp.per_channel or qp.thresholds.dim() != 1:
        raise ValueError(f"{where}: only per-tensor threshold (N2UQ) activations can be exported")
    levels = qp.qmax - qp.qmin + 1
    if qp.thresholds.numel() != levels - 1:
        raise ValueError(f"{where}: {qp.thresholds.numel()} thresholds for {levels} levels; expected {levels - 1}")
    last = s.initializer(f"{base}.act_axes", np.array([-1], dtype=np.int64))
    x = _emit(s, "Unsqueeze", [value, last], base)
    x = _emit(s, "Greater", [x, s.initializer(f"{base}.act_thresholds", qp.thresholds.float().numpy())], base)
    x = _emit(s, "Cast", [x], base, to=TensorProto.FLOAT)
    x = _emit(s, "ReduceSum", [x, last], base, keepdims=0)
    if qp.qmin != 0:
        x = _emit(s, "Add", [x, s.initializer(f"{base}.act_qmin", np.array(qp.qmin, dtype=np.float32))], base)
    one = s.initializer(f"{base}.act_unit_scale", np.array(1.0, dtype=np.float32))
    zero = s.initializer(f"{base}.act_code_zero", np.array(0), dtype)
    q = _emit(s, "QuantizeLinear", [x, one, zero], base)
    scale = s.initializer(f"{base}.act_scale", qp.scale.float().numpy())
    zp = s.initializer(f"{base}.act_zero_point", qp.zero_point.numpy(), dtype)
    return _emit(s, "DequantizeLinear", [q, scale, zp], base)


def activation_prefix(path: str) -> str:
    """Name prefix of the nodes that quantize the activation of the module at ``path``.

    The chain ends in a node named ``<prefix>DequantizeLinear`` (``..._1`` for a second call);
    :func:`fxfusion.passes.verify.verify_onnx` uses it to check each quantizer on its own input.
    """
    return f"{path}/act/"


def _emit(s: _Surgery, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
    node = s.node(op, inputs, activation_prefix(base).rstrip("/"), **attrs)
    s.pending.append(node)
    return node.output[0]


def _quantize_standalone(s: _Surgery, plan: _Plan, ranks: dict[str, int]) -> LayerExport:
    markers = [n for n in s.graph.node if n.domain == _MARKER_DOMAIN and n.attribute[0].s.decode() == plan.name]
    if not markers:
        raise OnnxExportError(
            f"{plan.name}: this quantizer is not called in forward on the traced path, so it cannot be "
            f"placed in the graph; remove it or disable it (enabled=False)"
        )
    desc = ""
    for marker in markers:
        _, desc = _activation_chain(s, marker.input[0], plan.act, plan.name, plan.name, ranks.get(plan.name))
        if plan.act.bits <= 4 and _QDQ_PROPAGATING.intersection(s.consumer_ops(marker.output[0])):
            # onnxruntime would move this DequantizeLinear forward across that op and run the op on
            # int4 (see _QDQ_PROPAGATING); a Max at the grid's lower end (a no-op) stops it
            low, _ = _grid_ends(plan.act, ranks.get(plan.name))
            _emit(s, "Max", [s.pending[-1].output[0], s.initializer(f"{plan.name}.act_dq_min", low)], plan.name)
        s.pending[-1].output[0] = marker.output[0]  # the chain takes the placeholder's place
        s.replace[marker.name] = list(s.pending)
    return LayerExport(
        plan.name, plan.kind, "-", desc, len(markers), act_bits=plan.act.bits, act_type=_type_name(plan.act)
    )


def _ort_bias_rounding(graph: onnx.GraphProto, plans: list[_Plan]) -> list[str]:
    """Layers whose float bias onnxruntime's optimizer will round, and by how much.

    From ``ORT_ENABLE_BASIC`` on, onnxruntime's ``WeightBiasQuantization`` rewrites the float bias
    of a Conv/Gemm whose input is a per-tensor DequantizeLinear and whose output reaches a
    QuantizeLinear without branching (Relu/Clip allowed) into ``DQ(rint(b / (s_x s_w)), s_x s_w)``.
    That is what integer kernels need, but it is not the PyTorch model unless its bias already
    lies on that grid; the result can then differ by one quantization step at a few elements.
    """
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    notes = []
    for plan in plans:
        if plan.act is None or plan.weight is None:
            continue
        for node in consumers.get(f"{plan.name}.weight", []):
            if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
                continue
            dq = producer.get(node.input[0])
            if dq is None or dq.op_type != "DequantizeLinear" or len(inits[dq.input[1]].dims) != 0:
                continue
            if not _single_path_to_quantize(node, consumers):
                continue
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            step = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32) * plan.weight.scale.float().numpy()
            snapped = (np.rint(bias / step) * step).astype(np.float32)
            if not np.array_equal(snapped, bias):
                worst = float(np.max(np.abs(snapped - bias) / step))
                notes.append(
                    f"{plan.name}: onnxruntime (ORT_ENABLE_BASIC and above) rounds this float bias to int32 at "
                    f"scale s_x*s_w (off by up to {worst:.2f} of that step), so its outputs can differ from "
                    f"PyTorch by one quantization step at a few elements; put the bias on that grid "
                    f"(b = rint(b / (s_x s_w)) * s_x s_w) in the deployed model to make them equal"
                )
    return notes


def _single_path_to_quantize(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    while True:
        nxt = consumers.get(node.output[0], [])
        if len(nxt) != 1:
            return False
        if nxt[0].op_type == "QuantizeLinear":
            return True
        if nxt[0].op_type not in ("Relu", "Clip"):
            return False
        node = nxt[0]


def _set_opsets(proto: onnx.ModelProto, opset: int) -> None:
    kept = [o for o in proto.opset_import if o.domain != _MARKER_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, opset)
