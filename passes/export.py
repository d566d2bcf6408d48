"""Export a deployed model to ONNX with real QuantizeLinear/DequantizeLinear nodes.

torch's own fake-quant export cannot write sub-8-bit grids (DESIGN.md, "Facts checked"), so the
route is: export the *float* graph with the legacy TorchScript exporter (every quantizer disabled,
no constant folding, so initializers keep their parameter names), then insert the quantization
by ONNX graph surgery. For every enabled quantized layer at module path ``P``::

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
  Clip/QuantizeLinear fusion throws on 4-bit zero points) and per-channel grids. A 4-bit grid whose
  zero point is not the type's minimum also gets a lone ``Max`` to its lower end (a no-op): it
  stops onnxruntime's ReluQuantFusion from deleting a preceding Relu, which that fusion does for
  every non-8-bit zero point without checking it.
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

The result passes ``onnx.checker`` (full check) and loads in onnxruntime's CPU provider before
the file is written atomically; on any failure no file is left behind.
"""

from __future__ import annotations

import copy
import io
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from fxfusion.quant.base import QParams
from fxfusion.quant.layers import is_quantized
from fxfusion.report import format_table, write_atomic

__all__ = [
    "ExportReport",
    "LayerExport",
    "OnnxExportError",
    "activation_prefix",
    "export_onnx",
    "flatten_outputs",
    "quantized_activations",
]

MIN_OPSET = 13  # per-axis DequantizeLinear
INT4_MIN_OPSET = 21  # INT4/UINT4 QuantizeLinear/DequantizeLinear
_LEGACY_MAX_OPSET = 20  # highest opset the TorchScript exporter emits natively
_MARKER_DOMAIN = "fxfusion.export"
_MARKER_OP = "QuantPlaceholder"


class OnnxExportError(RuntimeError):
    """The model could not be written as ONNX (an unsupported op, a failed check)."""


@dataclass
class LayerExport:
    """How one quantized layer (or standalone quantizer) was written.

    ``weight`` and ``act`` describe the grids in words; ``*_bits`` and ``*_type`` (an ONNX integer
    type name such as ``"INT4"``) are None where that tensor stayed float.
    """

    layer: str
    kind: str
    weight: str = "float"
    act: str = "float"
    nodes: int = 0  # ONNX compute nodes whose input received the activation QDQ
    weight_bits: int | None = None
    weight_type: str | None = None
    act_bits: int | None = None
    act_type: str | None = None

    def row(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "weight": self.weight, "act": self.act, "nodes": self.nodes}

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        opset: the default-domain opset.
        num_nodes: nodes in the final graph.
        op_histogram: op type -> count.
        layers: one record per quantized layer or standalone quantizer.
        file_size: bytes on disk.
        export_time_s: wall time of the whole export.
        notes: what the exporter said (tracer warnings) and what stayed float, and why.
    """

    path: str
    opset: int
    num_nodes: int
    op_histogram: dict[str, int]
    layers: list[LayerExport]
    file_size: int
    export_time_s: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = (
            f"ONNX export: {self.path}  (opset {self.opset}, {self.num_nodes} nodes, "
            f"{self.file_size / 1024:.1f} KiB, {self.export_time_s:.2f} s)"
        )
        ops = ", ".join(f"{k}: {v}" for k, v in sorted(self.op_histogram.items()))
        parts = [head, f"ops: {ops}", format_table([r.row() for r in self.layers], title="quantized layers")]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "opset": self.opset,
            "num_nodes": self.num_nodes,
            "op_histogram": dict(self.op_histogram),
            "layers": [r.to_dict() for r in self.layers],
            "file_size": self.file_size,
            "export_time_s": self.export_time_s,
            "notes": list(self.notes),
        }


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike,
    opset: int = 21,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> ExportReport:
    """Write a deployed model as ONNX with integer weights and QDQ activations.

    Args:
        model: a deployed model (see :func:`fxfusion.deploy`) whose quantized layers are
            ``QuantConv1d``/``QuantConv2d``/``QuantLinear``. A GABFusion site that deploy kept
            as an explicit per-channel op exports as float ops (and is noted); one that still
            normalizes (LayerNorm), or any site in a model without a deploy report, is refused.
            The model is not modified: a deep copy is exported.
        example_inputs: one tensor or a sequence of positional input tensors.
        path: the ``.onnx`` file to write (replaced atomically).
        opset: ONNX opset, ``>= 13``; quantizers of 4 bits or fewer need ``>= 21`` (INT4).
        input_names, output_names: graph names; default ``input_i`` / ``output_i`` (outputs are
            the model's tensors, nested tuples/lists/dicts flattened in order).
        dynamic_batch: make axis 0 of every input and output symbolic (``batch``).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ValueError: not deployed, bad opset, bad names, or an uninitialized quantizer.
        OSError: ``path`` cannot be written (checked before any work).
        OnnxExportError: torch cannot export an op, or the result fails the checker or
            onnxruntime.

    Example:
        >>> report = export_onnx(deployed, torch.randn(1, 3, 64, 64), "model.onnx")
        >>> print(report)
    """
    start = time.perf_counter()
    path = os.fspath(path)
    _check_writable(path)
    if (
        isinstance(opset, bool)
        or not isinstance(opset, int)
        or not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version()
    ):
        raise ValueError(
            f"opset={opset!r} is not supported; pass an int in {MIN_OPSET}..{onnx.defs.onnx_opset_version()} "
            f"(default 21, the first opset with INT4/UINT4 QuantizeLinear)"
        )
    kept_sites = _check_deployed(model)
    args = _as_args(example_inputs)

    work = copy.deepcopy(model).eval()
    plans, standalone = _plan(work)
    low_bit = [p.name for p in plans if p.needs_int4] + [p.name for p in standalone if p.needs_int4]
    if low_bit and opset < INT4_MIN_OPSET:
        raise ValueError(
            f"opset={opset} cannot hold the 4-bit-or-narrower quantizers of {', '.join(low_bit[:5])}"
            f"{' ...' if len(low_bit) > 5 else ''}: INT4/UINT4 QuantizeLinear needs opset >= {INT4_MIN_OPSET}; "
            f"pass opset={INT4_MIN_OPSET}"
        )
    with torch.no_grad():  # the bias as the quantized layer uses it: on the int32 grid of s_x·s_w
        for m in work.modules():
            if is_quantized(m) and m.bias is not None:
                m.bias.copy_(m._quant_bias())
    for q in _all_quantizers(work):
        q.enabled = False
    for plan in standalone:
        _set_module(work, plan.name, _Placeholder(plan.name, plan.quantizer))

    ranks, outputs = _dry_run(work, args, plans + standalone)
    in_names = _names(input_names, len(args), "input", "input_names")
    out_names = _names(output_names, len(outputs), "output", "output_names")
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n, t in zip(in_names, args) if t.dim() > 0}
        dynamic_axes.update({n: {0: "batch"} for n, t in zip(out_names, outputs) if t.dim() > 0})

    proto, notes = _torch_export(work, args, min(opset, _LEGACY_MAX_OPSET), in_names, out_names, dynamic_axes)
    if opset > _LEGACY_MAX_OPSET:
        # Opsets 21+ only widen operator type lists for what the legacy exporter emits; the
        # version converter stamps the graph and adapts anything that did change.
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as e:
            raise OnnxExportError(
                f"onnx's version converter could not lift the exported graph from opset {_LEGACY_MAX_OPSET} to "
                f"{opset} ({e}); pass opset=21"
            ) from e

    surgery = _Surgery(proto.graph)
    rows = [_quantize_layer(surgery, p, ranks) for p in plans]
    rows += [_quantize_standalone(surgery, p, ranks) for p in standalone]
    surgery.finish()
    _set_opsets(proto, opset)
    notes += kept_sites
    notes += [f"{p.name}: {p.skipped}" for p in plans + standalone if p.skipped]
    notes += _ort_bias_rounding(proto.graph, plans)

    data = _check_and_serialize(proto)
    write_atomic(path, data)
    ops = Counter(n.op_type for n in proto.graph.node)
    return ExportReport(
        path=path,
        opset=opset,
        num_nodes=len(proto.graph.node),
        op_histogram=dict(sorted(ops.items())),
        layers=rows,
        file_size=os.path.getsize(path),
        export_time_s=time.perf_counter() - start,
        notes=notes,
    )


# --------------------------------------------------------------------------- checks on the input


def _check_writable(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write the ONNX file {path!r}: it is a directory; pass a file path")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(
            f"cannot write the ONNX file {path!r}: {directory!r} is a file, not a directory; pass a path in a directory"
        )
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"cannot write the ONNX file {path!r}: directory {directory!r} does not exist; create it first"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".fxfusion-probe-")
    except OSError as e:
        raise PermissionError(
            f"cannot write the ONNX file {path!r}: directory {directory!r} is not writable ({e.strerror}); "
            f"pass a path in a writable directory"
        ) from e
    os.close(fd)
    os.unlink(probe)


def _check_deployed(model: nn.Module) -> list[str]:
    """Refuse a model that still trains GABFusion sites; name the explicit sites deploy kept."""
    from fxfusion.gabfusion import GABFusion

    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    sites = [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, GABFusion)]
    deployed = "deploy" in getattr(model, "fxfusion_reports", {})
    # deploy freezes every LayerNorm; a site it could not fold stays as an explicit per-channel op
    # (norm "frozen" or "none"), which exports as plain elementwise ops.
    training = [name for name, m in sites if m.norm in ("layernorm", "samplenorm") or not deployed]
    if training:
        raise ValueError(
            f"the model is not deployed: it still contains {len(training)} GABFusion training site(s) "
            f"({', '.join(training[:5])}{' ...' if len(training) > 5 else ''}); call "
            f"fxfusion.deploy(model, calib_data) first, then export the deployed model"
        )
    return [
        f"{name}: GABFusion site kept by deploy as an explicit per-channel op (its scales could not be "
        f"folded exactly into a neighbouring layer); it exports as float Mul/Add/Concat"
        for name, _ in sites
    ]


def _as_args(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    bad = [i for i, a in enumerate(args) if not isinstance(a, Tensor)]
    if not args or bad:
        raise TypeError(
            "example_inputs must be a tensor or a non-empty sequence of tensors (the positional "
            f"inputs of forward); got {type(example_inputs).__name__}"
            + (f" with non-tensor items at {bad}" if bad else "")
        )
    return args


def _names(names: Sequence[str] | None, count: int, prefix: str, arg: str) -> list[str]:
    if names is None:
        return [f"{prefix}_{i}" for i in range(count)]
    names = list(names)
    if len(names) != count or len(set(names)) != count or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{arg}={names!r} must be {count} distinct non-empty strings (one per {prefix} tensor)")
    return names


def flatten_outputs(obj: Any) -> list[Tensor]:
    """The tensors of a nested output, in order (tuples, lists, dict values), as the graph's outputs."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in flatten_outputs(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in flatten_outputs(x)]
    return []


# --------------------------------------------------------------------------- what to quantize


@dataclass
class _Plan:
    name: str
    kind: str
    weight: QParams | None
    act: QParams | None
    quantizer: nn.Module | None = None  # the act quantizer (for ranks and standalone nodes)
    skipped: str = ""

    @property
    def needs_int4(self) -> bool:
        return any(q is not None and q.bits <= 4 for q in (self.weight, self.act))


def _is_quantizer(m: nn.Module) -> bool:
    return hasattr(m, "qparams") and hasattr(m, "enabled") and hasattr(m, "bits")


def _all_quantizers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_quantizer(m)]


def quantized_activations(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, quantizer)`` of every enabled activation quantizer, in module order.

    ``path`` is the quantized layer's path for its ``act_quant``, or the quantizer's own path for
    one that sits outside a quantized layer; :func:`activation_prefix` of it names its ONNX nodes.
    """
    layers = [(name, m.act_quant) for name, m in model.named_modules() if is_quantized(m) and m.act_quant is not None]
    found = layers + _standalone_quantizers(model)
    return [(name, q) for name, q in found if q.enabled]


def _standalone_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Quantizers that are not a quantized layer's ``weight_quant``/``act_quant`` (nor inside one)."""
    owned: set[int] = set()
    for m in model.modules():
        if is_quantized(m):
            owned.update(id(sub) for q in (m.weight_quant, m.act_quant) if q is not None for sub in q.modules())
    found = []
    for name, q in model.named_modules():
        if _is_quantizer(q) and id(q) not in owned:
            owned.update(id(sub) for sub in q.modules())  # an adapter's inner quantizer is not another one
            found.append((name, q))
    return found


def _plan(model: nn.Module) -> tuple[list[_Plan], list[_Plan]]:
    """Quantized layers and standalone activation quantizers, with their grids."""
    plans: list[_Plan] = []
    for name, m in model.named_modules():
        if not is_quantized(m):
            continue
        wq, aq = m.weight_quant, m.act_quant
        plan = _Plan(
            name,
            type(m).__name__.replace("Quant", ""),
            _qparams(wq, f"{name}.weight_quant"),
            _qparams(aq, f"{name}.act_quant"),
            aq,
        )
        off = [f"{name}.{k}" for k, q in (("weight_quant", wq), ("act_quant", aq)) if q is not None and not q.enabled]
        if off:
            plan.skipped = f"{', '.join(off)} disabled (enabled=False): left in float, as in the PyTorch model"
        if plan.weight is not None and (plan.weight.axis not in (None, 0) or plan.weight.thresholds is not None):
            raise ValueError(
                f"{name}.weight_quant: only uniform per-tensor or per-output-channel (axis=0) weight grids "
                f"can be exported, got axis={plan.weight.axis}"
                f"{' with thresholds' if plan.weight.thresholds is not None else ''}"
            )
        plans.append(plan)
    standalone = [
        _Plan(name, type(q).__name__, None, _qparams(q, name), q)
        for name, q in _standalone_quantizers(model)
        if q.enabled
    ]
    if any(p.name == "" for p in standalone):
        raise ValueError("the model itself is a quantizer; export the network that contains it")
    return plans, standalone


def _qparams(q: nn.Module | None, where: str) -> QParams | None:
    if q is None or not q.enabled:
        return None
    try:
        qp = q.qparams()
    except RuntimeError as e:
        raise ValueError(f"{where}: cannot read its quantization parameters: {e}") from e
    if not isinstance(qp, QParams):
        raise TypeError(f"{where}.qparams() returned {type(qp).__name__}; it must return fxfusion.quant.QParams")
    return qp


class _PlaceholderFn(torch.autograd.Function):
    """Identity in PyTorch; a named placeholder node in the traced ONNX graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, key: str) -> Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, key: str) -> Any:
        out = g.op(f"{_MARKER_DOMAIN}::{_MARKER_OP}", x, key_s=key)
        out.setType(x.type())
        return out


class _Placeholder(nn.Module):
    """Stands in for a standalone quantizer while the float graph is traced."""

    def __init__(self, key: str, quantizer: nn.Module) -> None:
        super().__init__()
        self.key = key
        self.quantizer = quantizer  # kept so that rank recording finds it

    def forward(self, x: Tensor) -> Tensor:
        self.quantizer(x)  # disabled: identity, but it lets the rank hook see x
        return _PlaceholderFn.apply(x, self.key)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _dry_run(model: nn.Module, args: tuple[Tensor, ...], plans: list[_Plan]) -> tuple[dict[str, int], list[Tensor]]:
    """The float model's flat outputs, and the rank each activation quantizer sees (for its axis)."""
    ranks: dict[str, int] = {}
    handles = []
    by_id = {id(p.quantizer): p.name for p in plans if p.quantizer is not None}

    def hook(m: nn.Module, inputs: tuple[Any, ...]) -> None:
        ranks.setdefault(by_id[id(m)], inputs[0].dim())

    for m in model.modules():
        if id(m) in by_id:
            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            outputs = flatten_outputs(model(*args))
    finally:
        for h in handles:
            h.remove()
    return ranks, outputs


# --------------------------------------------------------------------------- torch export


def _torch_export(
    model: nn.Module,
    args: tuple[Tensor, ...],
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
) -> tuple[onnx.ModelProto, list[str]]:
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                model,
                args,
                buffer,
                dynamo=False,
                do_constant_folding=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
        except Exception as e:
            raise _explain_export_failure(e, model, args, opset) from e
    notes = sorted({f"torch.onnx: {w.message}" for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    return onnx.load_from_string(buffer.getvalue()), notes


def _explain_export_failure(
    error: Exception, model: nn.Module, args: tuple[Tensor, ...], opset: int
) -> OnnxExportError:
    match = re.search(r"aten::(\w+)", str(error))
    op = match.group(1) if match else None
    where = _module_calling(model, args, op) if op else None
    what = f"operator aten::{op}" if op else "the model"
    inside = f" in module {where!r}" if where else ""
    return OnnxExportError(
        f"torch.onnx (TorchScript exporter, opset {opset}) could not export {what}{inside} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Replace that op with a supported "
        f"equivalent in the module's forward, or register a symbolic for it with "
        f"torch.onnx.register_custom_op_symbolic, then export again"
    )


def _module_calling(model: nn.Module, args: tuple[Tensor, ...], op: str) -> str | None:
    """Best effort: the innermost module whose forward called a torch function named like ``op``.

    aten names differ from Python names in places (``fft_fft2`` is ``torch.fft.fft2``,
    ``_unique2`` is ``Tensor.unique``): an exact name wins, then a name that ``op`` ends with.
    """
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    stack: list[str] = []
    calls: list[tuple[str, str]] = []  # (function name, innermost module)

    class _Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kwargs=None):
            calls.append((getattr(func, "__name__", ""), stack[-1] if stack else "<root>"))
            return func(*a, **(kwargs or {}))

    def enter(m: nn.Module, _inputs: Any) -> None:
        stack.append(names[id(m)])

    def leave(_m: nn.Module, _inputs: Any, _output: Any) -> None:
        stack.pop()

    handles = []
    for m in model.modules():
        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.no_grad(), _Spy():
            model(*args)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    bare = op.strip("_")
    for matches in (
        lambda f: f == op,
        lambda f: f.strip("_") == bare,
        lambda f: len(f) > 2 and (bare.endswith("_" + f.strip("_")) or bare.rstrip("0123456789") == f.strip("_")),
    ):
        for fname, module in calls:
            if fname and matches(fname):
                return module
    return None


# --------------------------------------------------------------------------- ONNX surgery


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

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.taken = set(self.inits) | {i.name for i in graph.input} | {o.name for o in graph.output}
        for n in graph.node:
            self.taken.update(n.input)
            self.taken.update(n.output)
        for n in graph.node:  # nodes are keyed by name below: make names unique
            n.name = self.name(n.name or f"/{n.op_type}")
        self.first: list[onnx.NodeProto] = []  # nodes that read only initializers
        self.before: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to place before it
        self.replace: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to place instead
        self.pending: list[onnx.NodeProto] = []  # the chain being built

    def name(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def consumers(self, value: str) -> list[tuple[onnx.NodeProto, int]]:
        return [(n, i) for n in self.graph.node for i, v in enumerate(n.input) if v == value]

    def initializer(self, base: str, array: np.ndarray, dtype: int | None = None) -> str:
        name = self.name(base)
        if dtype in (TensorProto.INT4, TensorProto.UINT4):
            tensor = helper.make_tensor(name, dtype, array.shape, array.astype(np.int64).flatten().tolist())
        elif dtype is not None:
            tensor = helper.make_tensor(name, dtype, array.shape, array.flatten().tolist())
        else:
            tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [self.name(f"{base}_{op}_out")], name=self.name(f"{base}/{op}"), **attrs)

    def finish(self) -> None:
        nodes = list(self.first)
        for n in self.graph.node:
            nodes += self.before.get(n.name, [])
            nodes += self.replace.get(n.name, [n])
        del self.graph.node[:]
        self.graph.node.extend(nodes)


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
            node.input[index] = out
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
    s.graph.initializer.remove(float_init)
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
    # onnxruntime's ReluQuantFusion (ORT_ENABLE_EXTENDED) deletes a Relu in front of a QuantizeLinear
    # whose zero point is neither INT8 nor UINT8 without looking at it; that is only right when the
    # zero point is the type's minimum. A Max to the grid's lower end (a no-op before the
    # saturating QuantizeLinear) keeps such a Relu in place.
    guarded = not clipped and dtype in (TensorProto.INT4, TensorProto.UINT4) and bool((qp.zero_point != lo).any())
    if clipped or guarded:
        low = ((qp.qmin - qp.zero_point.float()) * qp.scale.float()).numpy()
        high = ((qp.qmax - qp.zero_point.float()) * qp.scale.float()).numpy()
        if qp.per_channel:
            shape = [1] * rank
            shape[axis_attrs["axis"]] = -1
            low, high = low.reshape(shape), high.reshape(shape)
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


def _check_and_serialize(proto: onnx.ModelProto) -> bytes:
    import onnxruntime as ort

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"the exported graph fails onnx.checker: {e}") from e
    data = proto.SerializeToString()
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxExportError(f"onnxruntime (CPUExecutionProvider) cannot load the exported graph: {e}") from e
    return data
