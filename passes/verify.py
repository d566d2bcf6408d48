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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fxfusion.report import format_table

__all__ = ["MAX_MISMATCH_FRACTION", "OutputCheck", "VerifyReport", "verify_onnx"]

MAX_MISMATCH_FRACTION = 1e-3
_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")


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


@dataclass
class VerifyReport:
    """What :func:`verify_onnx` measured.

    Attributes:
        path: the ONNX file.
        tolerance: relative tolerance (fraction of each output's range).
        checks: one :class:`OutputCheck` per output and optimization level.
        max_abs_error: the largest abs error over all checks.
        max_mismatch_fraction: the largest mismatch fraction over all checks.
        passed: ``max_mismatch_fraction <= MAX_MISMATCH_FRACTION`` (0.1%).
    """

    path: str
    tolerance: float
    checks: list[OutputCheck] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=0.0)

    @property
    def max_mismatch_fraction(self) -> float:
        return max((c.mismatch_fraction for c in self.checks), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_mismatch_fraction <= MAX_MISMATCH_FRACTION

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        head = (
            f"ONNX verify: {self.path}  {verdict}  (max abs err {self.max_abs_error:.3g}, "
            f"max mismatch {self.max_mismatch_fraction:.3%} of elements beyond {self.tolerance:g} x range; "
            f"limit {MAX_MISMATCH_FRACTION:.1%})"
        )
        return head + "\n" + format_table([c.row() for c in self.checks])

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "max_abs_error": self.max_abs_error,
            "max_mismatch_fraction": self.max_mismatch_fraction,
            "checks": [c.row() for c in self.checks],
        }


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Tensor | Sequence[Tensor],
    *,
    tolerance: float = 1e-4,
) -> VerifyReport:
    """Compare onnxruntime (CPU, optimizations off and on) with the PyTorch model in eval mode.

    Args:
        model: the model that was exported (run in eval mode; its train/eval flags are restored).
        path: the ONNX file.
        inputs: one tensor or a sequence of positional inputs (the batch may differ from the
            export example when the export used ``dynamic_batch``).
        tolerance: an element mismatches when ``|onnx - torch| > tolerance * range``, with
            ``range = max - min`` of the PyTorch output.

    Returns:
        A :class:`VerifyReport`; ``report.passed`` says whether at most 0.1% of the elements of
        every output mismatch.

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

    expected = [t.detach().cpu().numpy() for t in _flatten(_run_eval(model, args))]
    report = VerifyReport(path=path, tolerance=float(tolerance))
    for level in _LEVELS:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed_names = [i.name for i in session.get_inputs()]
        if len(feed_names) != len(args):
            raise ValueError(
                f"{path!r} takes {len(feed_names)} input(s) {feed_names} but {len(args)} were given; "
                f"pass the same positional inputs as the export's example_inputs"
            )
        out_names = [o.name for o in session.get_outputs()]
        if len(out_names) != len(expected):
            raise ValueError(
                f"{path!r} has {len(out_names)} output(s) {out_names} but the model returns {len(expected)} "
                f"tensor(s); verify the model that was exported"
            )
        got = session.run(None, {n: a.detach().cpu().numpy() for n, a in zip(feed_names, args)})
        for name, ref, out in zip(out_names, expected, got):
            report.checks.append(_compare(name, level, ref, out, tolerance))
    return report


def _run_eval(model: nn.Module, args: tuple[Tensor, ...]) -> Any:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        for m, training in modes:
            m.training = training


def _flatten(obj: Any) -> list[Tensor]:
    """The tensors of a nested output, in order (the same order as the exporter's outputs)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _flatten(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _flatten(x)]
    return []


def _compare(name: str, level: str, ref: np.ndarray, out: np.ndarray, tolerance: float) -> OutputCheck:
    if ref.shape != out.shape:
        raise ValueError(f"output {name!r}: onnxruntime shape {out.shape} differs from PyTorch shape {ref.shape}")
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    error = np.abs(out64 - ref64)
    finite = ref64[np.isfinite(ref64)]
    span = float(finite.max() - finite.min()) if finite.size else 0.0
    # A constant output has no range; fall back to its magnitude so that the test stays relative.
    scale = span if span > 0 else max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-12)
    nan_mismatch = np.isnan(ref64) != np.isnan(out64)
    bad = (np.nan_to_num(error, nan=0.0) > tolerance * scale) | nan_mismatch
    return OutputCheck(
        output=name,
        level=level,
        shape=tuple(ref.shape),
        max_abs_error=float(np.nanmax(error)) if error.size else 0.0,
        output_range=span,
        mismatch_fraction=float(bad.mean()) if bad.size else 0.0,
    )
