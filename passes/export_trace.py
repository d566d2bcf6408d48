"""Trace the float graph of a deployed model with torch's TorchScript ONNX exporter.

torch cannot export sub-8-bit fake quantization (``docs/DESIGN.md``, "Facts checked"), so the
export traces the model with every quantizer disabled and lets ``onnx_qdq`` insert the
quantization afterwards. This module prepares that float copy (biases on their int32 grid,
quantizers off, standalone quantizers replaced by named placeholder nodes), runs it once to
learn its outputs and the rank each activation quantizer sees, calls ``torch.onnx.export``, and
turns an exporter failure into an :class:`OnnxExportError` that names the op and the module
that called it.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from fxfusion.passes.export_plan import _all_quantizers, _Plan
from fxfusion.passes.export_records import OnnxExportError
from fxfusion.passes.runtime import set_submodule, tensors
from fxfusion.quant.layers import is_quantized

__all__: list[str] = []

_MARKER_DOMAIN = "fxfusion.export"  # the placeholder node's domain and op; onnx_qdq replaces them
_MARKER_OP = "QuantPlaceholder"


def _float_copy(model: nn.Module, standalone: list[_Plan]) -> None:
    """Make ``model`` (the export's own copy) the float graph to trace, in place.

    Each quantized layer's bias is set to what the layer uses (on the int32 grid of s_x·s_w),
    every quantizer is disabled, and each standalone quantizer becomes a placeholder node.
    """
    with torch.no_grad():
        for m in model.modules():
            if is_quantized(m) and m.bias is not None:  # a new tensor: the copy shares the model's weights
                m.bias = nn.Parameter(m._quant_bias(), requires_grad=m.bias.requires_grad)
    for q in _all_quantizers(model):
        q.enabled = False
    for plan in standalone:
        set_submodule(model, plan.name, _Placeholder(plan.name, plan.quantizer))


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
            outputs = tensors(model(*args))
    finally:
        for h in handles:
            h.remove()
    return ranks, outputs


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
