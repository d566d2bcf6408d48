"""The GABFusion training subgraph that replaces every fusion site.

At a site that fused branches ``x_1 .. x_K`` with ``cat`` or ``add``, the rewrite
inserts ``LN(fuse(α_1·x_1, ..., α_K·x_K))`` (arXiv 2511.05898):

- ``α`` is one positive scalar per branch. Paper v1 learns it from 0.5; we keep it
  positive with ``α = exp(log_alpha)`` so that folding α later through ReLU-family
  activations stays exact (they are positively homogeneous). Paper v2
  ("balanced") sets ``α = softmax(λ)`` with dual logits ``λ`` that the optimizer never
  touches; :mod:`fxfusion.balance` updates them from per-branch gradient energies,
  which this module records in backward.
- ``LN`` normalizes across the feature axis at each position, per sample, without
  affine parameters unless ``affine=True`` (the paper's equations have none).
  ``norm="samplenorm"`` normalizes each sample over all its non-batch axes instead, and
  ``norm="none"`` keeps only α.

The paper's form changes what a trained model computes (on the demo's FP32 detector mAP@0.5 fell
from 0.83 to 0.54 before QAT). With ``preserve=True`` the site instead computes

    out = fuse(x_1, ..., x_K) + mix · (γ ⊙ LN(h) + β − fuse(x_1, ..., x_K)),   h = fuse(α_1·x_1, ..., α_K·x_K)

with a gate ``mix`` (a buffer, 0 at first) and γ, β matched to the per-channel mean and spread
of ``fuse(x)`` on calibration data (:meth:`calibrate`). At ``mix = 0`` the site *is* the original
fusion, bit for bit: the rewritten model computes what the original computed, and a site whose
gate is closed again at the end of QAT deploys as the original op with nothing to fold.
:class:`fxfusion.NormSchedule` opens the gate during QAT and may close it before deployment
(TaperNorm-style, arXiv 2602.10408), so the network learns with the normalization and ends
without it. With ``norm="none"`` the site is ``γ ⊙ h + β`` (α and a per-channel scale, equal to
``fuse(x)`` at first) and the gate starts open.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GABFusion", "ALPHA_MODES", "NORMS", "branches", "fuse", "gate_value", "preserving_sites", "set_gate"]

ALPHA_MODES = ("learned", "balanced", "fixed")
NORMS = ("layernorm", "samplenorm", "none")


class GABFusion(nn.Module):
    """Scale each branch by α, fuse with the original op, normalize over the feature axis.

    Args:
        op: ``"cat"`` or ``"add"``, the fusion the site performed.
        num_branches: K, the number of fused tensors.
        dim: the feature axis (the cat axis, or the axis the consumer reads as channels).
        channels: size of the fused feature axis (needed for ``affine=True``).
        alpha: ``"learned"`` (v1, α = exp(log_alpha), init ``alpha_init``),
            ``"balanced"`` (v2, α = softmax(λ), λ updated by :class:`fxfusion.AlphaBalancer`)
            or ``"fixed"`` (a buffer, e.g. 1.0 to reproduce the original model).
        alpha_init: initial α for ``"learned"`` and ``"fixed"``.
        norm: ``"layernorm"`` (per position, across ``dim``), ``"samplenorm"`` (per sample, over
            every non-batch axis) or ``"none"``.
        affine: learn a per-channel γ, β after the normalization.
        preserve: the function-preserving form (module docstring): the output equals
            ``fuse(x_1, ..., x_K)`` until the ``mix`` gate opens. Needs ``channels`` (and for a
            cat ``branch_channels``, each branch's width); for an add, all branches start with
            the same α. :meth:`calibrate` sets γ, β from data so that the normalized form matches
            the original's per-channel            statistics.
        eps: the LayerNorm epsilon.
        add_tree: for an add of K > 2 branches, the original nesting as nested pairs of branch
            indices, e.g. ``(0, (1, 2))`` for ``a + (b + c)`` (default: left to right).

    Example:
        >>> m = GABFusion("cat", 2, dim=1, channels=6)
        >>> m(torch.randn(1, 2, 4, 4), torch.randn(1, 4, 4, 4)).shape
        torch.Size([1, 6, 4, 4])
    """

    preserve = False  # class defaults: modules pickled before these options existed still load
    add_tree = None

    def __init__(
        self,
        op: str,
        num_branches: int,
        dim: int,
        channels: int | None = None,
        *,
        alpha: str = "learned",
        alpha_init: float = 0.5,
        norm: str = "layernorm",
        affine: bool = False,
        eps: float = 1e-5,
        add_tree: tuple | None = None,
        preserve: bool = False,
        branch_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if op not in ("cat", "add"):
            raise ValueError(f"GABFusion op must be 'cat' or 'add', got {op!r}")
        if alpha not in ALPHA_MODES:
            raise ValueError(f"alpha={alpha!r} is not one of {ALPHA_MODES}")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not one of {NORMS}")
        if num_branches < 2:
            raise ValueError(f"a fusion joins at least 2 branches, got num_branches={num_branches}")
        if alpha_init <= 0:
            raise ValueError(f"alpha_init must be positive (keeps folds exact), got {alpha_init}")
        if (affine or preserve) and channels is None:
            flag = "preserve" if preserve else "affine"
            raise ValueError(f"{flag}=True needs the fused channel count: pass channels=")
        if preserve and op == "cat" and (branch_channels is None or len(branch_channels) != num_branches
                                         or sum(branch_channels) != channels):
            raise ValueError(f"preserve=True on a cat needs branch_channels: {num_branches} widths summing to "
                             f"channels={channels}, got {branch_channels}")
        affine = affine or preserve
        self.op, self.num_branches, self.dim, self.channels = op, num_branches, dim, channels
        self.alpha_mode, self.norm, self.eps = alpha, norm, eps
        self.add_tree = add_tree
        init = torch.full((num_branches,), float(alpha_init))
        if alpha == "learned":
            self.log_alpha = nn.Parameter(init.log())
        elif alpha == "balanced":
            # v2 dual logits start at 0; α = softmax(0) = 1/K.
            self.register_buffer("dual_logits", torch.zeros(num_branches))
            self.register_buffer("energy_ema", torch.zeros(num_branches))
        else:
            self.register_buffer("fixed_alpha", init)
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.weight = self.bias = None
        self.preserve = preserve
        if preserve:
            self.register_buffer("mix", torch.full((), 1.0 if norm == "none" else 0.0))
            self.branch_channels = tuple(branch_channels) if op == "cat" else None
            self._reset_identity()
        # Filled in backward (balanced mode): sum over the step of ||∂L/∂x_i||², per branch. Rank-local,
        # so not a buffer: DistributedDataParallel broadcasts rank 0's buffers before every forward,
        # which would overwrite the energy accumulated over earlier micro-batches (moved by _apply).
        self.grad_energy = torch.zeros(num_branches)

    def alpha(self) -> Tensor:
        """The current per-branch scales, shape (K,)."""
        if self.alpha_mode == "learned":
            return self.log_alpha.exp()
        if self.alpha_mode == "balanced":
            return torch.softmax(self.dual_logits, 0)
        return self.fixed_alpha

    def forward(self, *xs: Tensor | Sequence[Tensor]) -> Tensor:
        xs = branches(xs)
        if len(xs) != self.num_branches:
            raise ValueError(f"GABFusion built for {self.num_branches} branches got {len(xs)} inputs")
        if self.alpha_mode == "balanced" and self.training and torch.is_grad_enabled():
            xs = self._record_energy(xs)
        a = self.alpha()
        if self.op == "cat":  # one cat: α_i·x_i side by side is the cat times α spread over its channels
            plain = self.fuse(xs)
            shape = [1] * plain.dim()
            shape[self.dim] = -1
            h = plain * torch.cat([a[i:i + 1].expand(x.shape[self.dim]) for i, x in enumerate(xs)]).view(shape)
        else:
            h = self.fuse([a[i] * x for i, x in enumerate(xs)])
            plain = self.fuse(xs) if self.preserve else None
        # lerp is exactly ``plain`` at mix = 0
        out = torch.lerp(plain, self.normalize(h), self.mix) if self.preserve else self.normalize(h)
        # in the fused tensor's layout, whatever the normalization's is
        return out if out.stride() == h.stride() else torch.empty_like(h).copy_(out)

    def fuse(self, xs: Sequence[Tensor]) -> Tensor:
        """The site's original op on ``xs``: cat along ``dim``, or the sum in its original nesting."""
        return fuse(self.op, list(xs), self.dim, self.add_tree)

    def gate_closed(self) -> bool:
        """True when this is a function-preserving site whose gate is shut: it computes the plain fusion."""
        return self.preserve and float(self.mix) == 0.0

    def normalize(self, h: Tensor) -> Tensor:
        """Per-sample normalization of ``h`` (per position across ``dim`` for LayerNorm, over all
        non-batch axes for samplenorm; none for norm='none'), then γ, β if the site has them."""
        if self.norm == "layernorm":  # one fused kernel (and backward) over the feature axis moved last
            moved = h.movedim(self.dim, -1)
            return F.layer_norm(moved, moved.shape[-1:], self.gamma(), self.bias, self.eps).movedim(-1, self.dim)
        out = h
        if self.norm == "samplenorm":
            out = F.layer_norm(h, h.shape[1:], eps=self.eps)
        if self.weight is not None:
            shape = [1] * h.dim()
            shape[self.dim] = -1
            out = out * self.gamma().view(shape) + self.bias.view(shape)
        return out

    def gamma(self) -> Tensor | None:
        """The per-channel scale γ the site applies. A function-preserving site keeps it positive
        (at least sqrt(eps), where :meth:`calibrate` starts a constant channel): a γ pushed through 0
        by training would flip that channel, and deploy could no longer fold it through a ReLU."""
        if self.weight is None or not self.preserve:
            return self.weight
        return self.weight.clamp_min(self.eps ** 0.5)

    @torch.no_grad()
    def calibrate(self, mean: Tensor, std: Tensor) -> None:
        """Match the normalized form to the original fusion's per-channel ``mean`` and ``std``.

        Sets ``γ = std`` and ``β = mean`` (per channel of ``fuse(x)``), so that once ``mix``
        rises, ``γ⊙LN(h) + β`` keeps each channel's mean and spread (it cannot keep the values:
        the per-position normalization is not a per-channel affine). The output at ``mix = 0``
        does not depend on it. With ``norm="none"`` nothing is needed (γ = 1/α is exact).
        """
        if not self.preserve:
            raise RuntimeError("calibrate() is for GABFusion(preserve=True) sites")
        if self.norm == "none":
            return
        self.weight.copy_(std.to(self.weight).clamp_min(self.eps ** 0.5))
        self.bias.copy_(mean.to(self.bias))

    @torch.no_grad()
    def _reset_identity(self) -> None:
        """γ = 1/α per channel and β = 0: ``γ⊙h + β = fuse(x)`` exactly for ``norm="none"``."""
        self.weight.copy_(1.0 / self._alpha_per_channel())
        self.bias.zero_()

    def _alpha_per_channel(self) -> Tensor:
        a = self.alpha().detach()
        if self.op == "add":
            if not torch.allclose(a, a[0].expand_as(a)):
                raise ValueError(f"a function-preserving add site needs equal initial α, got {a.tolist()}")
            return a[0].expand(self.channels).clone()
        return torch.cat([a[i].expand(n) for i, n in enumerate(self.branch_channels)])

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double() also move grad_energy
        super()._apply(fn, *args, **kwargs)
        self.grad_energy = fn(self.grad_energy)
        return self

    def _record_energy(self, xs: list[Tensor]) -> list[Tensor]:
        # G_i = ||∂L/∂x_i||, the whole gradient this site sends into branch i: through the normalized
        # path and, for a gated site, through the plain fusion as well (at mix = 0 only the latter).
        # A fresh view per branch, so that the hook sees this site's share only.
        out = []
        for i, x in enumerate(xs):
            if x.requires_grad:
                x = x.view_as(x)
                x.register_hook(lambda g, i=i: self._add_energy(i, g))
            out.append(x)
        return out

    def _add_energy(self, i: int, g: Tensor) -> None:
        self.grad_energy[i] += g.detach().pow(2).sum()

    def extra_repr(self) -> str:
        a = ", ".join(f"{v:.3g}" for v in self.alpha().detach().tolist())
        gate = f", mix={float(self.mix):.3g}" if self.preserve else ""
        return (f"op={self.op}, branches={self.num_branches}, dim={self.dim}, alpha={self.alpha_mode}[{a}], "
                f"norm={self.norm}, affine={self.weight is not None}{gate}")


def branches(args: tuple) -> list[Tensor]:
    """A site's branch tensors from its call arguments: ``site(a, b)`` or ``site([a, b])`` (YOLO's Concat)."""
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)


def fuse(op: str, xs: list[Tensor], dim: int, add_tree: tuple | None = None) -> Tensor:
    """A site's original fusion: ``torch.cat(xs, dim)``, or the sum of ``xs`` in the nesting ``add_tree``."""
    return torch.cat(xs, dim) if op == "cat" else _sum(xs, add_tree)


def _sum(xs: list[Tensor], tree: tuple | None = None) -> Tensor:
    if tree is not None:  # the original association: float addition is not associative
        return _sum_tree(xs, tree)
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _sum_tree(xs: list[Tensor], tree: tuple | int) -> Tensor:
    if isinstance(tree, int):
        return xs[tree]
    return _sum_tree(xs, tree[0]) + _sum_tree(xs, tree[1])


def preserving_sites(model: nn.Module) -> dict[str, GABFusion]:
    """Every function-preserving (gated) GABFusion site of ``model``, by path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, GABFusion) and m.preserve}


def gate_value(model: nn.Module) -> float | None:
    """The ``mix`` gate shared by the function-preserving sites of ``model`` (the largest if they differ;
    None: there are none)."""
    values = {float(m.mix) for m in preserving_sites(model).values()}
    return max(values) if values else None


@torch.no_grad()
def set_gate(model: nn.Module, value: float) -> int:
    """Set ``mix`` of every function-preserving GABFusion site in ``model``; returns how many."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"the normalization gate must be in [0, 1], got {value}")
    sites = preserving_sites(model)
    for m in sites.values():
        m.mix.fill_(value)
    return len(sites)
