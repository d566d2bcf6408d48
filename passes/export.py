"""Export a deployed model to ONNX with real QuantizeLinear/DequantizeLinear nodes.

:func:`export_onnx` is the public entry point; it reads top to bottom as its steps:

1. check the inputs (the path is writable, the opset, the model is deployed) before any work;
2. plan what to quantize, with each quantizer's grid (``export_plan``);
3. trace the *float* graph with torch's TorchScript exporter, every quantizer disabled and
   standalone quantizers as placeholder nodes (``export_trace``), lifted to the opset asked for;
4. insert the quantization by ONNX graph surgery (``onnx_qdq``): integer weight codes behind a
   DequantizeLinear, a QuantizeLinear -> DequantizeLinear chain (with a clip where the grid is
   narrower than its 4- or 8-bit type) on each quantized activation, a threshold staircase for
   N2UQ; the rules and why they are exact are in ``onnx_qdq``'s docstring and ``docs/DESIGN.md``
   ("Facts checked");
5. check the result with ``onnx.checker`` (full check) and an onnxruntime CPU session, and only
   then write the file atomically; on any failure no file is left behind.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
from torch import Tensor, nn

from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion
from fxfusion.passes.export_plan import _Plan, _plan, quantized_activations
from fxfusion.passes.export_records import LayerExport, OnnxExportError
from fxfusion.passes.export_trace import _dry_run, _float_copy, _torch_export
from fxfusion.passes.onnx_qdq import (
    _ort_bias_rounding,
    _quantize_layer,
    _quantize_standalone,
    _set_opsets,
    _Surgery,
    activation_prefix,
)
from fxfusion.passes.runtime import network, paused_gc, structural_copy
from fxfusion.passes.runtime import tensors as flatten_outputs
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
        return asdict(self)


@paused_gc()
def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike,
    opset: int = 21,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    metadata: Mapping[str, object] | None = None,
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
        dynamic_axes: more symbolic axes, ``{name: {axis: label}}`` as for ``torch.onnx.export``
            (e.g. ``{"images": {2: "height", 3: "width"}}``), added to those of ``dynamic_batch``.
        metadata: key-value pairs for the model's ``metadata_props`` (values written as
            ``str(value)``), e.g. the class names a runtime reads back.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ValueError: not deployed, bad opset, bad names, or an uninitialized quantizer.
        OSError: ``path`` cannot be written (checked before any work).
        OnnxExportError: torch cannot export an op, or the result fails the checker or
            onnxruntime.

    Example:
        >>> import os, tempfile
        >>> from fxfusion.zoo import build
        >>> qat = fxfusion.quantize(fxfusion.rewrite(build("resnet"), x), x)
        >>> deployed = fxfusion.deploy(qat, [x], progress=False)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
        >>> report = export_onnx(deployed, x, path)
        >>> report.opset, report.op_histogram["QuantizeLinear"] > 0
        (21, True)
    """
    start = time.perf_counter()
    path = os.fspath(path)
    _check_writable(path)
    _check_opset(opset)
    model = network(model, "export_onnx")
    kept_sites = _check_deployed(model)
    args = _as_args(example_inputs)

    # plan: what to quantize, with its grids, read from a copy that the export changes (modules and
    # tensors replaced, never written into: it shares the model's weights)
    work = structural_copy(model).eval()
    plans, standalone = _plan(work)
    _check_low_bit(plans + standalone, opset)

    # trace the float graph
    _float_copy(work, standalone)
    ranks, outputs = _dry_run(work, args, plans + standalone)
    in_names = _names(input_names, len(args), "input", "input_names")
    out_names = _names(output_names, len(outputs), "output", "output_names")
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        axes = {n: {0: "batch"} for n, t in zip(in_names + out_names, list(args) + outputs) if t.dim() > 0}
    for name, more in (dynamic_axes or {}).items():
        if name not in in_names + out_names:
            raise ValueError(f"dynamic_axes names {name!r}, which is no input or output: {in_names + out_names}")
        axes[name] = {**axes.get(name, {}), **{int(a): str(label) for a, label in more.items()}}
    proto, notes = _torch_export(work, args, min(opset, _LEGACY_MAX_OPSET), in_names, out_names, axes or None)
    proto = _lift_opset(proto, opset)
    _undo_initializer_sharing(proto.graph)

    # QDQ surgery
    surgery = _Surgery(proto.graph, {f"{p.name}.weight": p.weight.bits for p in plans if p.weight is not None})
    rows = [_quantize_layer(surgery, p, ranks) for p in plans]
    rows += [_quantize_standalone(surgery, p, ranks) for p in standalone]
    surgery.finish()
    _set_opsets(proto, opset)
    notes += kept_sites
    notes += [f"{p.name}: {p.skipped}" for p in plans + standalone if p.skipped]
    notes += _ort_bias_rounding(proto.graph, plans)

    for key, value in (metadata or {}).items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = str(key), str(value)

    # check, then write
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


def _check_opset(opset: int) -> None:
    if (
        isinstance(opset, bool)
        or not isinstance(opset, int)
        or not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version()
    ):
        raise ValueError(
            f"opset={opset!r} is not supported; pass an int in {MIN_OPSET}..{onnx.defs.onnx_opset_version()} "
            f"(default 21, the first opset with INT4/UINT4 QuantizeLinear)"
        )


def _check_low_bit(plans: list[_Plan], opset: int) -> None:
    """Refuse an opset below 21 when a quantizer needs INT4/UINT4."""
    low_bit = [p.name for p in plans if p.needs_int4]
    if low_bit and opset < INT4_MIN_OPSET:
        raise ValueError(
            f"opset={opset} cannot hold the 4-bit-or-narrower quantizers of {', '.join(low_bit[:5])}"
            f"{' ...' if len(low_bit) > 5 else ''}: INT4/UINT4 QuantizeLinear needs opset >= {INT4_MIN_OPSET}; "
            f"pass opset={INT4_MIN_OPSET}"
        )


def _undo_initializer_sharing(graph: onnx.GraphProto) -> None:
    """The TorchScript exporter stores equal parameters once and feeds the others through
    ``Identity`` nodes (e.g. two all-zero biases). Give each parameter its own initializer again:
    the surgery finds every layer's weight under its own name, and the graph has no node that
    computes nothing (a deployed model's node count then compares with another's)."""
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            graph.initializer.append(copy_)
            inits[copy_.name] = copy_
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _check_deployed(model: nn.Module) -> list[str]:
    """Refuse a model that still has GABFusion training sites; name the explicit sites deploy kept."""
    training = [name or "<root>" for name, m in model.named_modules() if isinstance(m, GABFusion)]
    if training:
        raise ValueError(
            f"the model is not deployed: it still contains {len(training)} GABFusion training site(s) "
            f"({', '.join(training[:5])}{' ...' if len(training) > 5 else ''}); call "
            f"fxfusion.deploy(model, calib_data) first, then export the deployed model"
        )
    return [
        f"{name or '<root>'}: GABFusion site kept by deploy as an explicit per-channel op (its scales could not "
        f"be folded exactly into a neighbouring layer); it exports as float Mul/Add/Concat"
        for name, m in model.named_modules() if isinstance(m, DeployedFusion) and not m.is_bare
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


# --------------------------------------------------------------------------- opset, check and write


def _lift_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The traced graph (opset <= 20) at ``opset``."""
    if opset <= _LEGACY_MAX_OPSET:
        return proto
    # Opsets 21+ only widen operator type lists for what the legacy exporter emits; the
    # version converter stamps the graph and adapts anything that did change.
    try:
        return onnx.version_converter.convert_version(proto, opset)
    except Exception as e:
        raise OnnxExportError(
            f"onnx's version converter could not lift the exported graph from opset {_LEGACY_MAX_OPSET} to "
            f"{opset} ({e}); pass opset=21"
        ) from e


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
