"""Check an exported ONNX file against the PyTorch model it came from, with onnxruntime.

The deployed PyTorch model runs in eval mode; onnxruntime's CPU provider runs the file twice,
with graph optimizations off (``ORT_DISABLE_ALL``: the graph as written) and on
(``ORT_ENABLE_ALL``: what a deployment gets, with QDQ fusions). Outputs are flattened in order
(nested tuples, lists and dict values) and compared element-wise.

**What a pass promises.** ``report.passed`` holds only when, for every output at both levels,

1. the largest difference is at most ``bound`` (default 1e-2, :data:`MAX_RELATIVE_ERROR`) of
   that output's range in PyTorch (``max - min``; its magnitude for a constant output), or within
   16 float32 ulps of its magnitude: *onnxruntime's output is within 1e-2 of the deployed PyTorch
   model's output range*; and
2. the graph computes what the model computes: at most 0.1% of the elements differ by more than
   ``tolerance * range`` (default 1e-4), or every difference is explained by rounding-tie flips
   (below).

The first condition bounds the end-to-end disagreement; nothing can pass above it. The second
catches a wrong op whose error happens to stay below the bound.

**Why outputs differ at all.** A fake-quantized network and its QDQ graph compute the same
integers, except where a value lands within float rounding of a quantization threshold (``x / s``
on a tie): the two runtimes sum a conv in different orders, so they may pick neighbouring codes
one step apart, and the change spreads through every later layer's receptive field. How far it
moves the output depends on how sensitive the network is: a deep network with random weights can
amplify a handful of flips into a large part of its range (and then PyTorch against itself, with
another conv algorithm, differs about as much). verify then fails, because the file does not
reproduce that model's outputs to the promised bound, even though every op in it is right.

**Power-of-two scales remove the ties' cause.** When every quantizer has a power-of-two scale
(``quantize(..., pow2=True)``) and the bias sits on its int32 grid (as :mod:`fxfusion.quant.layers`
keeps it), each product in a conv or linear layer is an exact float32 number and so is every
partial sum, whatever the order (as long as it stays below 2^24 grid steps, which 2-8 bit codes
do in practice): both runtimes get the same bits, then round them the same way. The outputs are
then equal bit for bit wherever the float ops between quantizers are exact too (add, concat, ReLU,
max pooling, nearest resizing); transcendental activations (SiLU, GELU, sigmoid) and averages are
computed with different approximations and can still flip a tie.

**Diagnostics** (they explain a result; ``passed`` needs condition 1 whatever they say). Each
activation quantizer of the graph is checked on its own: onnxruntime's input to the quantizer is
fed to the PyTorch quantizer, and the codes must agree (``local`` column, expected 0: the export
is exact). The ``end_to_end`` column compares the codes of the two full runs, and shows where
ties start. Then every float segment is checked with the codes held equal: PyTorch runs once more
with each quantizer's output replaced by onnxruntime's, and its input to every quantizer and its
outputs are compared with onnxruntime's (``forced`` checks, same tolerance). When the quantizers
are exact and every segment agrees, the differences are rounding-tie flips only
(``tie_flips_only``), which satisfies condition 2; a wrong op anywhere (before, between or after
the quantizers) fails it.
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

from fxfusion.passes.export_plan import quantized_activations
from fxfusion.passes.onnx_qdq import activation_prefix
from fxfusion.passes.runtime import eval_mode, network, tensors
from fxfusion.report import format_table

__all__ = [
    "MAX_MISMATCH_FRACTION",
    "MAX_RELATIVE_ERROR",
    "OutputCheck",
    "QuantizerCheck",
    "VerifyReport",
    "verify_onnx",
]

MAX_MISMATCH_FRACTION = 1e-3  # condition 2: share of elements allowed beyond tolerance x range
MAX_RELATIVE_ERROR = 1e-2  # condition 1, the promise: max |onnxruntime - PyTorch| <= this x range
_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")
_FLOAT_NOISE_ULPS = 16


@dataclass(frozen=True)
class OutputCheck:
    """One output compared at one onnxruntime optimization level.

    Attributes:
        output: the output's name (or, for a forced check, the tensor compared).
        level: the onnxruntime optimization level.
        shape: the output's shape.
        max_abs_error: the largest ``|onnxruntime - PyTorch|`` (NaN where only one side is NaN is
            counted in ``relative_error``, not here).
        output_range: ``max - min`` of the PyTorch output (finite elements).
        mismatch_fraction: share of elements that differ by more than ``tolerance`` x range.
        relative_error: ``max_abs_error`` over the range (over the largest magnitude when the
            range is 0); ``inf`` when one side is NaN where the other is not.
        noise_floor: 16 float32 ulps of the output's largest magnitude: differences below it are
            rounding noise whatever the range.
    """

    output: str
    level: str
    shape: tuple[int, ...]
    max_abs_error: float
    output_range: float
    mismatch_fraction: float
    relative_error: float = 0.0
    noise_floor: float = 0.0

    def within(self, bound: float) -> bool:
        """The largest difference is at most ``bound`` x range, or below the noise floor."""
        return self.relative_error <= bound or (
            self.max_abs_error <= self.noise_floor and self.relative_error != float("inf")
        )

    def row(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "ort_level": self.level,
            "shape": list(self.shape),
            "max_abs_err": self.max_abs_error,
            "range": self.output_range,
            "err/range": self.relative_error,
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
        tolerance: per-element tolerance (fraction of each output's range) for the mismatch count.
        bound: the promise: the largest difference allowed, as a fraction of each output's range.
        checks: one :class:`OutputCheck` per output and optimization level.
        max_abs_error: the largest abs error over all checks.
        max_relative_error: the largest ``max_abs_error / range`` over all checks.
        max_mismatch_fraction: the largest mismatch fraction over all checks.
        within_bound: every output at every level is within ``bound`` x its range (or within
            float noise): onnxruntime's output is that close to the PyTorch model's.
        passed: :attr:`within_bound`, and the graph computes what the model computes: every output
            mismatches on at most ``MAX_MISMATCH_FRACTION`` (0.1%) of its elements, or the export
            is :attr:`tie_flips_only`. ``passed`` implies :attr:`within_bound`.
        quantizers: one :class:`QuantizerCheck` per activation quantizer found in the graph.
        exact: every quantizer of the graph agrees with PyTorch on its own input.
        forced: with the codes held equal, PyTorch's input to each quantizer and its outputs
            against onnxruntime's (ORT_DISABLE_ALL), one :class:`OutputCheck` each.
        tie_flips_only: exact, and every forced check within the 0.1% rule: the remaining
            differences are rounding ties that the two runtimes resolve differently. A diagnostic:
            it says why outputs differ, not that they are close.
        notes: what could not be checked, and why.
    """

    path: str
    tolerance: float
    bound: float = MAX_RELATIVE_ERROR
    checks: list[OutputCheck] = field(default_factory=list)
    quantizers: list[QuantizerCheck] = field(default_factory=list)
    forced: list[OutputCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=0.0)

    @property
    def max_relative_error(self) -> float:
        return max((c.relative_error for c in self.checks), default=0.0)

    @property
    def max_mismatch_fraction(self) -> float:
        return max((c.mismatch_fraction for c in self.checks), default=0.0)

    @property
    def within_bound(self) -> bool:
        return bool(self.checks) and all(c.within(self.bound) for c in self.checks)

    @property
    def passed(self) -> bool:
        return self.within_bound and (self.max_mismatch_fraction <= MAX_MISMATCH_FRACTION or self.tie_flips_only)

    @property
    def exact(self) -> bool:
        return all(q.local_mismatch == 0 for q in self.quantizers)

    @property
    def tie_flips_only(self) -> bool:
        return (bool(self.quantizers) and self.exact and bool(self.forced)
                and all(c.mismatch_fraction <= MAX_MISMATCH_FRACTION for c in self.forced))

    def __str__(self) -> str:
        few = self.max_mismatch_fraction <= MAX_MISMATCH_FRACTION
        if self.passed:
            verdict = "PASSED" if few else "PASSED (rounding-tie flips only)"
        elif not self.within_bound:
            verdict = f"FAILED: onnxruntime differs from PyTorch by more than {self.bound:g} of the output range"
        else:
            verdict = (f"FAILED: within {self.bound:g} of the output range, but {self.max_mismatch_fraction:.3%} of "
                       f"elements differ and not by rounding-tie flips alone")
        lines = [
            f"ONNX verify: {self.path}  {verdict}",
            f"  max abs err {self.max_abs_error:.3g} = {self.max_relative_error:.3g} of the output range "
            f"(bound {self.bound:g}); {self.max_mismatch_fraction:.3%} of elements beyond {self.tolerance:g} x range "
            f"(limit {MAX_MISMATCH_FRACTION:.1%} unless rounding-tie flips only)",
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
        if not self.within_bound and self.tie_flips_only:
            lines.append(
                "every op of the graph is right (quantizers exact, every float segment agrees with the codes held "
                "equal), but this model turns the codes that the two runtimes round differently at ties into "
                f"differences above {self.bound:g} of its range: the file does not reproduce its outputs that closely. "
                "Quantized with power-of-two scales (quantize(..., pow2=True)), convs and linears sum exact products "
                "and the two runtimes compute the same bits wherever the float ops between quantizers are exact"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "tolerance": self.tolerance,
            "bound": self.bound,
            "passed": self.passed,
            "within_bound": self.within_bound,
            "exact": self.exact,
            "tie_flips_only": self.tie_flips_only,
            "max_abs_error": self.max_abs_error,
            "max_relative_error": self.max_relative_error,
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
    bound: float = MAX_RELATIVE_ERROR,
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
        bound: the largest difference a pass allows, as a fraction of each output's range
            (default 1e-2); see the module docstring.
        check_quantizers: also compare every activation quantizer of the graph with its PyTorch
            module (keeps one activation per quantizer in memory).

    Returns:
        A :class:`VerifyReport`; ``report.passed`` says whether every output, at both levels, is
        within ``bound`` x its range of PyTorch's (``report.within_bound``) and at most 0.1% of its
        elements mismatch or the differences are rounding-tie flips only
        (``report.tie_flips_only``); ``report.exact`` whether every quantizer agrees on its own input.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the inputs or outputs do not match the graph's.

    Example:
        >>> import os, tempfile
        >>> from fxfusion.zoo import build
        >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
        >>> deployed = fxfusion.deploy(fxfusion.quantize(build("resnet"), x), [x], progress=False)
        >>> _ = fxfusion.export_onnx(deployed, x, path)
        >>> report = verify_onnx(deployed, path, torch.randn(4, 3, 32, 32))
        >>> report.passed, report.exact
        (True, True)
    """
    import onnxruntime as ort

    model = network(model, "verify_onnx")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verify_onnx: no ONNX file at {path!r}; run export_onnx first")
    if not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} must be > 0, e.g. 1e-4")
    if not bound > 0:
        raise ValueError(f"bound={bound!r} must be > 0, e.g. 1e-2 (a fraction of each output's range)")
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError("inputs must be a tensor or a non-empty sequence of tensors (forward's positional inputs)")
    feed = [a.detach().cpu().numpy() for a in args]

    report = VerifyReport(path=path, tolerance=float(tolerance), bound=float(bound))
    quantizers = quantized_activations(model) if check_quantizers else []
    with eval_mode(model), torch.no_grad(), _recording(quantizers) as seen:
        expected = [t.detach().cpu().numpy() for t in tensors(model(*args))]
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
        with eval_mode(model), torch.no_grad():
            values = _check_quantizers(ort, model, path, feed, quantizers, seen, report)
            if values is not None:
                _check_forced(model, args, quantizers, values, tolerance, report)
    return report


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
    model: nn.Module,
    path: str,
    feed: list[np.ndarray],
    quantizers: list[tuple[str, nn.Module]],
    seen: dict[str, np.ndarray],
    report: VerifyReport,
) -> dict[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]] | None:
    """Run the graph with each quantizer's input and output exposed, and compare the codes.

    Returns ``{layer: (ORT input, ORT output, ORT graph outputs)}`` for :func:`_check_forced`."""
    layers = dict(model.named_modules())
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
        if ran is not None and ran.shape != quantized.shape:
            ran = _padded(layers.get(layer), ran)
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
    absent = next((layer for layer, _ in quantizers if layer not in values), None)
    if absent is not None:  # before any hook is registered: none may stay on the user's model
        report.notes.append(f"{absent}: its codes could not be held equal; the forced check skipped it")
        return
    inputs: dict[str, np.ndarray] = {}
    layers = dict(model.named_modules())
    handles = []
    try:
        for layer, quantizer in quantizers:

            def hook(_m: nn.Module, inp: Any, output: Tensor, layer: str = layer) -> Tensor | None:
                if layer in inputs:  # a quantizer called twice: hold only its first call
                    return None
                raw, quantized, _ = values[layer]
                if tuple(output.shape) != quantized.shape:
                    raw, quantized = (_unpadded(layers.get(layer), v) for v in (raw, quantized))
                if tuple(output.shape) != quantized.shape or tuple(inp[0].shape) != raw.shape:
                    return None
                inputs[layer] = inp[0].detach().cpu().numpy().copy()
                return torch.from_numpy(quantized).to(dtype=output.dtype, device=output.device)

            handles.append(quantizer.register_forward_hook(hook))
        outputs = [t.detach().cpu().numpy() for t in tensors(model(*args))]
    finally:
        for h in handles:
            h.remove()
    missing = [layer for layer, _ in quantizers if layer not in inputs]
    if missing:
        report.notes.append(f"the codes of {missing} could not be held equal (shape differs from the graph's); "
                            f"no forced check")
        return
    for layer, _ in quantizers:
        raw = values[layer][0]
        if raw.shape != inputs[layer].shape:
            raw = _unpadded(layers.get(layer), raw)
        report.forced.append(_compare(f"input of {layer}", "ORT_DISABLE_ALL", inputs[layer], raw, tolerance))
    final = next(iter(values.values()))[2]
    for k, (ref, out) in enumerate(zip(outputs, final)):
        report.forced.append(_compare(f"output {k}", "ORT_DISABLE_ALL", ref, out, tolerance))


def _padding(layer: nn.Module | None) -> tuple[int, ...] | None:
    """The padding a conv with a copying padding mode (reflect, replicate, circular) applies before its
    kernel: torch.onnx exports it as a Pad node, so the graph quantizes the padded input (the same
    values: padding copies them). None for any other layer."""
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.padding_mode != "zeros":
        return tuple(layer._reversed_padding_repeated_twice)
    return None


def _padded(layer: nn.Module | None, t: np.ndarray) -> np.ndarray:
    """A quantizer output as the graph holds it (padded where :func:`_padding` says so)."""
    pad = _padding(layer)
    if pad is None:
        return t
    return torch.nn.functional.pad(torch.from_numpy(t), pad, mode=layer.padding_mode).numpy()


def _unpadded(layer: nn.Module | None, t: np.ndarray) -> np.ndarray:
    """The graph's padded tensor cut back to what the module's quantizer sees."""
    pad = _padding(layer)
    if pad is None:
        return t
    index = [slice(None)] * t.ndim
    for k in range(len(pad) // 2):  # pairs from the last dimension backwards
        lo, hi = pad[2 * k], pad[2 * k + 1]
        index[t.ndim - 1 - k] = slice(lo, t.shape[t.ndim - 1 - k] - hi)
    return t[tuple(index)]


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
    finite_error = error[~np.isnan(error)]
    max_error = float(finite_error.max()) if finite_error.size else 0.0
    return OutputCheck(
        output=name,
        level=level,
        shape=tuple(ref.shape),
        max_abs_error=max_error,
        output_range=span,
        mismatch_fraction=float(bad.mean()) if bad.size else 0.0,
        relative_error=float("inf") if nan_mismatch.any() else max_error / scale,
        noise_floor=ulps,
    )
