"""Check an exported ONNX file against the PyTorch model it came from, with onnxruntime.

The deployed PyTorch model runs in eval mode; onnxruntime's CPU provider runs the file twice,
with graph optimizations off (``ORT_DISABLE_ALL``: the graph as written) and on
(``ORT_ENABLE_ALL``: what a deployment gets, with QDQ fusions). Outputs are flattened in order
(nested tuples, lists and dict values) and compared element-wise.

A fake-quantized network and its QDQ graph compute the same integers, except where a value lands
within float rounding of a quantization threshold (``x / s`` on a tie): there the two sides may
pick neighbouring codes, one quantization step apart, and the difference propagates. So besides
the max abs error the report counts the *fraction* of elements that differ by more than
``tolerance * (output range)``; the export passes when that fraction is at most 0.1% for every
output and optimization level.

In a deep network one such tie is enough to move many output elements (the changed code spreads
through every later layer's receptive field), so the report also checks each activation
quantizer of the graph on its own: onnxruntime's input to the quantizer is fed to the PyTorch
quantizer, and the codes must agree (``local`` column, expected 0: the export is exact). The
``end_to_end`` column compares the codes of the two full runs, and shows where ties start.

Then every float segment is checked with the codes held equal: PyTorch runs once more with each
quantizer's output replaced by onnxruntime's, and its input to every quantizer and its outputs are
compared with onnxruntime's (``forced`` checks, same tolerance). An export whose quantizers are
exact and whose segments all agree differs from PyTorch only by propagated rounding-tie flips, and
passes even when those move more than 0.1% of an output; a wrong op anywhere (before, between or
after the quantizers) still fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from fxfusion.passes.export import activation_prefix, flatten_outputs, quantized_activations
from fxfusion.report import format_table

__all__ = ["MAX_MISMATCH_FRACTION", "OutputCheck", "QuantizerCheck", "VerifyReport", "verify_onnx"]

MAX_MISMATCH_FRACTION = 1e-3
_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")
_FLOAT_NOISE_ULPS = 16


@dataclass(frozen=True)
class OutputCheck:
    """One output compared at one onnxruntime optimization level."""

    output: str
    level: str
    shape: tuple[int, ...]
    max_abs_error: float
    output_range: float
    mismatch_fraction: float

    def row(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "ort_level": self.level,
            "shape": list(self.shape),
            "max_abs_err": self.max_abs_error,
            "range": self.output_range,
            "mismatch": self.mismatch_fraction,
        }


@dataclass(frozen=True)
class QuantizerCheck:
    """One activation quantizer of the graph compared with its PyTorch module (ORT_DISABLE_ALL).

    Attributes:
        layer: the quantized layer (or the standalone quantizer) whose activation it is.
        elements: size of the quantized tensor.
        local_mismatch: fraction of codes where the PyTorch quantizer, given onnxruntime's own
            input tensor, disagrees with onnxruntime's QuantizeLinear/DequantizeLinear (0 when exact).
        end_to_end_mismatch: fraction of codes that differ between the two full runs.
    """

    layer: str
    elements: int
    local_mismatch: float
    end_to_end_mismatch: float

    def row(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "elements": self.elements,
            "local": self.local_mismatch,
            "end_to_end": self.end_to_end_mismatch,
        }


@dataclass
class VerifyReport:
    """What :func:`verify_onnx` measured.

    Attributes:
        path: the ONNX file.
        tolerance: relative tolerance (fraction of each output's range).
        checks: one :class:`OutputCheck` per output and optimization level.
        max_abs_error: the largest abs error over all checks.
        max_mismatch_fraction: the largest mismatch fraction over all checks.
        passed: every output at every level mismatches on at most ``MAX_MISMATCH_FRACTION`` (0.1%)
            of its elements, or the export is :attr:`tie_flips_only`.
        quantizers: one :class:`QuantizerCheck` per activation quantizer found in the graph.
        exact: every quantizer of the graph agrees with PyTorch on its own input.
        forced: with the codes held equal, PyTorch's input to each quantizer and its outputs
            against onnxruntime's (ORT_DISABLE_ALL), one :class:`OutputCheck` each.
        tie_flips_only: exact, and every forced check within the 0.1% rule: the remaining
            differences are rounding ties that the two runtimes resolve differently.
        notes: what could not be checked, and why.
    """

    path: str
    tolerance: float
    checks: list[OutputCheck] = field(default_factory=list)
    quantizers: list[QuantizerCheck] = field(default_factory=list)
    forced: list[OutputCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=0.0)

    @property
    def max_mismatch_fraction(self) -> float:
        return max((c.mismatch_fraction for c in self.checks), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_mismatch_fraction <= MAX_MISMATCH_FRACTION or self.tie_flips_only

    @property
    def exact(self) -> bool:
        return all(q.local_mismatch == 0 for q in self.quantizers)

    @property
    def tie_flips_only(self) -> bool:
        return (bool(self.quantizers) and self.exact and bool(self.forced)
                and all(c.mismatch_fraction <= MAX_MISMATCH_FRACTION for c in self.forced))

    def __str__(self) -> str:
        verdict = "FAILED"
        if self.passed:
            within = self.max_mismatch_fraction <= MAX_MISMATCH_FRACTION
            verdict = "PASSED" if within else "PASSED (rounding-tie flips only)"
        lines = [
            f"ONNX verify: {self.path}  {verdict}  (max abs err {self.max_abs_error:.3g}, "
            f"max mismatch {self.max_mismatch_fraction:.3%} of elements beyond {self.tolerance:g} x range; "
            f"limit {MAX_MISMATCH_FRACTION:.1%})",
            format_table([c.row() for c in self.checks]),
        ]
        if self.quantizers:
            lines.append(format_table([q.row() for q in self.quantizers], title="activation codes that differ"))
            lines.append(f"quantizers exact on their own inputs: {'yes' if self.exact else 'NO'}")
            first = next((q for q in self.quantizers if q.end_to_end_mismatch > 0), None)
            if first is not None and self.exact:
                lines.append(
                    f"codes first differ at {first.layer}: values that onnxruntime computed in a different "
                    f"float order landed on the other side of a rounding tie; later layers inherit the change"
                )
        if self.forced:
            worst = max(self.forced, key=lambda c: c.mismatch_fraction)
            lines.append(f"with the codes held equal, {len(self.forced)} float segments checked: max mismatch "
                         f"{worst.mismatch_fraction:.3%} ({worst.output})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "exact": self.exact,
            "tie_flips_only": self.tie_flips_only,
            "max_abs_error": self.max_abs_error,
            "max_mismatch_fraction": self.max_mismatch_fraction,
            "checks": [c.row() for c in self.checks],
            "quantizers": [q.row() for q in self.quantizers],
            "forced": [c.row() for c in self.forced],
            "notes": list(self.notes),
        }


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Tensor | Sequence[Tensor],
    *,
    tolerance: float = 1e-4,
    check_quantizers: bool = True,
) -> VerifyReport:
    """Compare onnxruntime (CPU, optimizations off and on) with the PyTorch model in eval mode.

    Args:
        model: the model that was exported (run in eval mode; its train/eval flags are restored).
        path: the ONNX file.
        inputs: one tensor or a sequence of positional inputs (the batch may differ from the
            export example when the export used ``dynamic_batch``).
        tolerance: an element mismatches when ``|onnx - torch| > tolerance * range``, with
            ``range = max - min`` of the PyTorch output (and by more than 16 float32 ulps of the
            output's largest magnitude: below that it is rounding noise).
        check_quantizers: also compare every activation quantizer of the graph with its PyTorch
            module (keeps one activation per quantizer in memory).

    Returns:
        A :class:`VerifyReport`; ``report.passed`` says whether at most 0.1% of the elements of
        every output mismatch, or else whether the differences are rounding-tie flips only
        (``report.tie_flips_only``); ``report.exact`` whether every quantizer agrees on its own input.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the inputs or outputs do not match the graph's.

    Example:
        >>> report = verify_onnx(deployed, "model.onnx", torch.randn(8, 3, 64, 64))
        >>> assert report.passed, report
    """
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verify_onnx: no ONNX file at {path!r}; run export_onnx first")
    if not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} must be > 0, e.g. 1e-4")
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError("inputs must be a tensor or a non-empty sequence of tensors (forward's positional inputs)")
    feed = [a.detach().cpu().numpy() for a in args]

    report = VerifyReport(path=path, tolerance=float(tolerance))
    quantizers = quantized_activations(model) if check_quantizers else []
    with _eval_mode(model), _recording(quantizers) as seen:
        expected = [t.detach().cpu().numpy() for t in flatten_outputs(model(*args))]
    for level in _LEVELS:
        session = _session(ort, path, level)
        out_names = [o.name for o in session.get_outputs()]
        if len(out_names) != len(expected):
            raise ValueError(
                f"{path!r} has {len(out_names)} output(s) {out_names} but the model returns {len(expected)} "
                f"tensor(s); verify the model that was exported"
            )
        got = session.run(None, _feed(session, feed, path))
        for name, ref, out in zip(out_names, expected, got):
            report.checks.append(_compare(name, level, ref, out, tolerance))
    if quantizers:
        with _eval_mode(model):
            values = _check_quantizers(ort, path, feed, quantizers, seen, report)
            if values is not None:
                _check_forced(model, args, quantizers, values, tolerance, report)
    return report


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def _recording(quantizers: list[tuple[str, nn.Module]]) -> Iterator[dict[str, np.ndarray]]:
    """The first output of each quantizer during the PyTorch run."""
    seen: dict[str, np.ndarray] = {}
    handles = []
    for name, q in quantizers:

        def hook(_m: nn.Module, _inputs: Any, output: Tensor, name: str = name) -> None:
            seen.setdefault(name, output.detach().cpu().numpy().copy())

        handles.append(q.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _session(ort: Any, model: str | bytes, level: str) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _feed(session: Any, feed: list[np.ndarray], path: str) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(feed):
        raise ValueError(
            f"{path!r} takes {len(names)} input(s) {names} but {len(feed)} were given; "
            f"pass the same positional inputs as the export's example_inputs"
        )
    return dict(zip(names, feed))


def _check_quantizers(
    ort: Any,
    path: str,
    feed: list[np.ndarray],
    quantizers: list[tuple[str, nn.Module]],
    seen: dict[str, np.ndarray],
    report: VerifyReport,
) -> dict[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]] | None:
    """Run the graph with each quantizer's input and output exposed, and compare the codes.

    Returns ``{layer: (ORT input, ORT output, ORT graph outputs)}`` for :func:`_check_forced`."""
    proto = onnx.load(path)
    producer = {o: n for n in proto.graph.node for o in n.output}
    by_name = {n.name: n for n in proto.graph.node}
    exposed: dict[str, tuple[str, str]] = {}  # layer -> (input value, output value)
    for layer, _ in quantizers:
        prefix = activation_prefix(layer)
        dq = by_name.get(prefix + "DequantizeLinear")
        if dq is None:
            report.notes.append(f"{layer}: no {prefix}DequantizeLinear node in the graph; its codes were not compared")
            continue
        first = dq
        while first.input[0] in producer and producer[first.input[0]].name.startswith(prefix):
            first = producer[first.input[0]]
        exposed[layer] = (first.input[0], dq.output[0])
    outputs = {o.name for o in proto.graph.output}
    for value in {v for pair in exposed.values() for v in pair} - outputs:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(value))
    graph_outputs = [o.name for o in proto.graph.output][:len(outputs)]
    session = _session(ort, proto.SerializeToString(), "ORT_DISABLE_ALL")
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, _feed(session, feed, path))))
    final = [values[name] for name in graph_outputs]
    forced: dict[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = {}
    for layer, quantizer in quantizers:
        if layer not in exposed:
            continue
        raw, quantized = (values[v] for v in exposed[layer])
        half_step = 0.5 * float(quantizer.qparams().scale.min())
        local = quantizer(torch.from_numpy(raw)).detach().cpu().numpy()
        ran = seen.get(layer)
        report.quantizers.append(
            QuantizerCheck(
                layer=layer,
                elements=int(quantized.size),
                local_mismatch=_code_mismatch(local, quantized, half_step),
                end_to_end_mismatch=_code_mismatch(ran, quantized, half_step) if ran is not None else float("nan"),
            )
        )
        forced[layer] = (raw, quantized, final)
    return forced if exposed else None


def _check_forced(
    model: nn.Module,
    args: tuple[Tensor, ...],
    quantizers: list[tuple[str, nn.Module]],
    values: dict[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]],
    tolerance: float,
    report: VerifyReport,
) -> None:
    """Run PyTorch with every quantizer's output replaced by onnxruntime's; compare each float segment."""
    inputs: dict[str, np.ndarray] = {}
    handles = []
    for layer, quantizer in quantizers:
        if layer not in values:
            report.notes.append(f"{layer}: its codes could not be held equal; the forced check skipped it")
            return

        def hook(_m: nn.Module, inp: Any, output: Tensor, layer: str = layer) -> Tensor | None:
            if layer in inputs:  # a quantizer called twice: hold only its first call
                return None
            raw, quantized, _ = values[layer]
            if tuple(output.shape) != quantized.shape or tuple(inp[0].shape) != raw.shape:
                return None
            inputs[layer] = inp[0].detach().cpu().numpy().copy()
            return torch.from_numpy(quantized).to(dtype=output.dtype, device=output.device)

        handles.append(quantizer.register_forward_hook(hook))
    try:
        outputs = [t.detach().cpu().numpy() for t in flatten_outputs(model(*args))]
    finally:
        for h in handles:
            h.remove()
    missing = [layer for layer, _ in quantizers if layer not in inputs]
    if missing:
        report.notes.append(f"the codes of {missing} could not be held equal (shape differs from the graph's); "
                            f"no forced check")
        return
    for layer, _ in quantizers:
        report.forced.append(_compare(f"input of {layer}", "ORT_DISABLE_ALL", inputs[layer], values[layer][0],
                                      tolerance))
    final = next(iter(values.values()))[2]
    for k, (ref, out) in enumerate(zip(outputs, final)):
        report.forced.append(_compare(f"output {k}", "ORT_DISABLE_ALL", ref, out, tolerance))


def _code_mismatch(a: np.ndarray, b: np.ndarray, half_step: float) -> float:
    if a.shape != b.shape:
        return 1.0
    return float((np.abs(a.astype(np.float64) - b) > half_step).mean()) if a.size else 0.0


def _compare(name: str, level: str, ref: np.ndarray, out: np.ndarray, tolerance: float) -> OutputCheck:
    if ref.shape != out.shape:
        raise ValueError(f"output {name!r}: onnxruntime shape {out.shape} differs from PyTorch shape {ref.shape}")
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    error = np.abs(out64 - ref64)
    finite = ref64[np.isfinite(ref64)]
    span = float(finite.max() - finite.min()) if finite.size else 0.0
    # A constant output has no range; fall back to its magnitude so that the test stays relative.
    scale = span if span > 0 else max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-12)
    # Differences of a few float32 ulps of the output's magnitude are rounding noise whatever its range
    # (a near-constant output of magnitude 10 and range 3e-4 differs by 1 ulp = 9.5e-7 between runtimes).
    ulps = _FLOAT_NOISE_ULPS * float(np.finfo(np.float32).eps) * (float(np.abs(finite).max()) if finite.size else 0.0)
    nan_mismatch = np.isnan(ref64) != np.isnan(out64)
    bad = (np.nan_to_num(error, nan=0.0) > max(tolerance * scale, ulps)) | nan_mismatch
    return OutputCheck(
        output=name,
        level=level,
        shape=tuple(ref.shape),
        max_abs_error=float(np.nanmax(error)) if error.size else 0.0,
        output_range=span,
        mismatch_fraction=float(bad.mean()) if bad.size else 0.0,
    )
