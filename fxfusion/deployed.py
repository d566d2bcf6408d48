"""The deployed form of a fusion site: ``fuse(s_1⊙x_1, ..., s_K⊙x_K) + b``, or the bare op.

:class:`~fxfusion.GABFusion` is what trains; this is what a site becomes in
:func:`fxfusion.deploy`, as torchao turns its train-time modules into converted ones. Deploy first
freezes each training site into this form (its α and its normalization, now a fixed per-channel
affine ``A⊙h + B``, give ``s_i = α_i·A`` and ``b = B``), then folds the scales and the shift
into neighbouring layers. A site whose affine was folded away is the bare op (``scales`` and
``shift`` None): its owner then gets its original forward back and the module disappears. A
site that could not be folded keeps its per-channel ``scales``/``shift`` and exports as float
Mul/Add around the Concat or Add.

:class:`ChannelAffine` is the other deployed form: a BatchNorm that folds into no conv, written
as the two float ops ``x·a + b`` that onnxruntime's Mul and Add compute with the same roundings
(deploy uses it for models quantized with power-of-two scales, whose export is otherwise exact).
For the same models, :class:`OrtHardsigmoid` and :class:`OrtHardswish` replace ``nn.Hardsigmoid``
and ``nn.Hardswish``: they compute onnxruntime's formula in PyTorch (measured bit-exact) and still
export as one node each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fxfusion.gabfusion import GABFusion, branches, fuse

__all__ = ["ChannelAffine", "DeployedFusion", "OrtHardsigmoid", "OrtHardswish"]


class DeployedFusion(nn.Module):
    """A fused site with fixed per-channel branch scales and an output shift (deploy's result).

    Args:
        op: ``"cat"`` or ``"add"``.
        num_branches: K.
        dim: the feature axis.
        add_tree: the original nesting of a K > 2 add (see :class:`GABFusion`).
        scales: per branch, a per-channel scale along ``dim`` (its width for a cat, the full
            width for an add); None: no scaling.
        shift: per-channel shift of the fused output; None: no shift.

    Example:
        >>> m = DeployedFusion("cat", 2, dim=1, scales=[torch.full((2,), 2.0), torch.ones(3)])
        >>> m(torch.ones(1, 2, 1, 1), torch.ones(1, 3, 1, 1)).flatten().tolist()
        [2.0, 2.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, op: str, num_branches: int, dim: int, *, add_tree: tuple | None = None,
                 scales: Sequence[Tensor] | None = None, shift: Tensor | None = None) -> None:
        super().__init__()
        if op not in ("cat", "add"):
            raise ValueError(f"DeployedFusion op must be 'cat' or 'add', got {op!r}")
        if scales is not None and len(scales) != num_branches:
            raise ValueError(f"{len(scales)} branch scales for {num_branches} branches")
        self.op, self.num_branches, self.dim, self.add_tree = op, num_branches, dim, add_tree
        self.scaled = scales is not None
        for i, s in enumerate(scales or ()):
            self.register_buffer(f"scale{i}", s.detach().clone().float())
        self.register_buffer("shift", None if shift is None else shift.detach().clone().float())

    @classmethod
    def from_training(cls, m: GABFusion, scale: Tensor | None = None, shift: Tensor | None = None,
                      widths: Sequence[int] | None = None) -> DeployedFusion:
        """Freeze a training site whose normalization is replaced by ``scale⊙h + shift``.

        ``widths`` are the branch widths along ``dim`` for a cat (needed to split ``scale``).
        A site with no normalization and no affine gives ``s_i = α_i`` (per channel).
        """
        alpha = m.alpha().detach().float()
        c = (scale.shape[0] if scale is not None else sum(widths) if widths else m.channels)
        if scale is None:
            scale = torch.ones(c)
        if m.op == "cat":
            if widths is None:
                raise ValueError("freezing a cat site needs its branch widths")
            parts = list(scale.float().split(list(widths)))
        else:
            parts = [scale.float()] * m.num_branches
        scales = [alpha[i] * parts[i] for i in range(m.num_branches)]
        return cls(m.op, m.num_branches, m.dim, add_tree=m.add_tree, scales=scales,
                   shift=None if shift is None else shift.float())

    @classmethod
    def bare(cls, m: GABFusion | DeployedFusion) -> DeployedFusion:
        """The site's original op with nothing around it."""
        return cls(m.op, m.num_branches, m.dim, add_tree=m.add_tree)

    @property
    def is_bare(self) -> bool:
        """True when the site computes the original fusion op exactly."""
        return not self.scaled and self.shift is None

    def branch_scales(self) -> list[Tensor] | None:
        """The per-channel scale of each branch (None: unscaled)."""
        return [getattr(self, f"scale{i}") for i in range(self.num_branches)] if self.scaled else None

    def forward(self, *xs: Tensor | Sequence[Tensor]) -> Tensor:
        xs = branches(xs)
        if len(xs) != self.num_branches:
            raise ValueError(f"DeployedFusion built for {self.num_branches} branches got {len(xs)} inputs")
        if self.scaled:
            xs = [x * self._along_dim(getattr(self, f"scale{i}"), x.dim()) for i, x in enumerate(xs)]
        out = fuse(self.op, list(xs), self.dim, self.add_tree)
        return out if self.shift is None else out + self._along_dim(self.shift, out.dim())

    def _along_dim(self, v: Tensor, ndim: int) -> Tensor:
        shape = [1] * ndim
        shape[self.dim] = -1
        return v.view(shape)

    def extra_repr(self) -> str:
        what = "bare" if self.is_bare else ", ".join(
            w for w, on in (("branch scales", self.scaled), ("shift", self.shift is not None)) if on)
        return f"op={self.op}, branches={self.num_branches}, dim={self.dim}, {what}"


class ChannelAffine(nn.Module):
    """``x·scale + shift`` per channel (axis 1): an eval-mode BatchNorm as two float ops.

    A BatchNorm kernel's rounding is its own: PyTorch's and onnxruntime's differ in the last bit
    on about a quarter of the elements, and a quantizer after the BatchNorm can turn such a bit
    into a different code. A multiply then an add, each rounded once, are the same IEEE
    operations in both runtimes, so a model quantized with power-of-two scales stays bit-exact
    in onnxruntime through it. It exports as one ``Mul`` and one ``Add`` whose constants are
    stored already broadcastable (``(C, 1, ..., 1)`` for an input of rank ``ndim``), so no
    reshape appears in the graph.

    Args:
        scale, shift: per-channel tensors of the same length.
        ndim: the rank of the input (4 for images).

    Example:
        >>> bn = nn.BatchNorm2d(2).eval()
        >>> affine = ChannelAffine.from_batchnorm(bn, ndim=4)
        >>> x = torch.randn(1, 2, 3, 3)
        >>> bool(torch.allclose(affine(x), bn(x), atol=1e-6))
        True
    """

    def __init__(self, scale: Tensor, shift: Tensor, ndim: int) -> None:
        super().__init__()
        if scale.shape != shift.shape or scale.dim() != 1:
            raise ValueError(f"ChannelAffine needs 1-d scale and shift of one length, got {tuple(scale.shape)} "
                             f"and {tuple(shift.shape)}")
        if ndim < 2:
            raise ValueError(f"ChannelAffine scales axis 1 of its input: ndim={ndim} has no such axis")
        shape = (-1,) + (1,) * (ndim - 2)
        self.register_buffer("scale", scale.detach().float().reshape(shape).clone())
        self.register_buffer("shift", shift.detach().float().reshape(shape).clone())

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, ndim: int) -> ChannelAffine:
        """The eval-mode affine of ``bn`` for inputs of rank ``ndim`` (ValueError without running statistics)."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{type(bn).__name__} without running statistics normalizes by the batch in eval "
                             "mode: it is not a fixed affine")
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.float()
            shift = -bn.running_mean.float() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.float()
        return cls(scale, shift, ndim)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift  # two ops, two roundings: no fused kernel

    def extra_repr(self) -> str:
        return f"channels={self.scale.shape[0]}, ndim={self.scale.dim() + 1}"


_SIXTH = 1.0 / 6.0  # onnxruntime's HardSigmoid alpha for PyTorch's hardsigmoid (beta 0.5)


class _HardOnnx(torch.autograd.Function):
    """The formula in PyTorch; one ``HardSigmoid`` or ``HardSwish`` node in the traced ONNX graph."""

    @staticmethod
    def forward(ctx: object, x: Tensor, swish: bool) -> Tensor:
        return _hard(x, swish)

    @staticmethod
    def symbolic(g: object, x: object, swish: bool) -> object:
        return g.op("HardSwish", x) if swish else g.op("HardSigmoid", x, alpha_f=_SIXTH, beta_f=0.5)


def _hard(x: Tensor, swish: bool) -> Tensor:
    # onnxruntime computes max(0, min(1, alpha*x + beta)) with alpha rounded to float32, one
    # rounding per op; PyTorch's kernel computes min(max(x + 3, 0), 6) / 6, which differs in the
    # last bit on about a quarter of the elements (DESIGN.md, "Facts checked")
    s = torch.clamp(x * _SIXTH + 0.5, 0.0, 1.0)  # the scalar is rounded to x's float32 first
    return x * s if swish else s


class OrtHardsigmoid(nn.Module):
    """``clamp(x/6 + 1/2, 0, 1)`` rounded as onnxruntime's ``HardSigmoid`` rounds it.

    ``nn.Hardsigmoid`` and onnxruntime agree to an ulp only; a quantizer downstream (a
    squeeze-and-excitation scale feeds a quantized conv) can turn that ulp into a different code.
    This module makes the deployed PyTorch model compute onnxruntime's bits, so a model quantized
    with power-of-two scales stays bit-exact through it. It exports as one ``HardSigmoid`` node.

    Example:
        >>> x = torch.linspace(-4, 4, 9)
        >>> bool(torch.allclose(OrtHardsigmoid()(x), nn.Hardsigmoid()(x), atol=1e-7))
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        return _HardOnnx.apply(x, False) if torch.onnx.is_in_onnx_export() else _hard(x, False)


class OrtHardswish(nn.Module):
    """``x·clamp(x/6 + 1/2, 0, 1)`` rounded as onnxruntime's ``HardSwish`` rounds it (see
    :class:`OrtHardsigmoid`); exports as one ``HardSwish`` node."""

    def forward(self, x: Tensor) -> Tensor:
        return _HardOnnx.apply(x, True) if torch.onnx.is_in_onnx_export() else _hard(x, True)
