"""ADA / Q-ADA: attention-distribution distillation at the fusion sites (arXiv 2511.05898).

The teacher is the frozen full-precision model, the student the quantized one. At every site
both feature maps ``X`` of shape (N, C, *spatial) are turned into one spatial attention
distribution per channel, and the student's distribution is pulled towards the teacher's.

Attention, per sample and channel, over the S spatial positions of that channel:

- v1, SimAM (``attention="simam"``)::

      μ = mean(X),  σ² = Σ (X − μ)² / (S − 1)
      e = (X − μ)² / (4 (σ² + λ)) + 1/2,            λ = 1e-4
      A = sigmoid(e)

- v2, Q-ADA (``attention="q-ada"``)::

      z = |X − μ_c| / (σ_c + κ)                      (σ_c with S − 1, as in SimAM)
      r = Δ / (s_c + κ),   Δ = |X − Q(X)|            (s_c: the quantizer step at the site)
      S = log(1 + z²) + γ · log(1 + r²)
      A = sigmoid(S)

  Without a known quantizer at a site, s_c = σ_c and Δ = 0, so r = 0.

Distribution, per channel: ``P_c = A_c / Σ_spatial A_c`` (teacher), ``R_c`` likewise (student).

Divergence, per sample and channel (the direction is teacher → student)::

    KL(P ‖ R) = Σ P · (log P − log R)
    JS(P, R)  = ½ KL(P ‖ M) + ½ KL(R ‖ M),   M = ½ (P + R)

Loss: ``weight · mean over sites of (mean over batch and channels of the spatial sum)``, i.e.
every site counts equally whatever its channel count. The paper adds it to the task loss with
weight 0.01.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fxfusion.gabfusion import GABFusion
from fxfusion.passes.runtime import unwrap

__all__ = [
    "ATTENTIONS",
    "DIVERGENCES",
    "ADALoss",
    "detach_ada",
    "js_divergence",
    "kl_divergence",
    "qada_attention",
    "simam_attention",
    "spatial_distribution",
]

ATTENTIONS = ("simam", "q-ada")
DIVERGENCES = ("kl", "js")

# Floor for log(); attention is a sigmoid of a non-negative energy, so P ≥ 0.5/(S·1) > 0 and the
# clamp only guards degenerate inputs (all-NaN channels, float16 underflow).
_LOG_FLOOR = 1e-12


def simam_attention(x: Tensor, lam: float = 1e-4) -> Tensor:
    """SimAM attention ``sigmoid((x−μ)²/(4(σ²+λ)) + ½)`` per (sample, channel) over the spatial axes.

    Args:
        x: features of shape (N, C, *spatial) with at least two spatial positions.
        lam: SimAM's λ regularizer.

    Returns:
        A tensor shaped like ``x`` with values in (0.62, 1).

    Example:
        >>> simam_attention(torch.zeros(1, 1, 2, 2))
        tensor([[[[0.6225, 0.6225],
                  [0.6225, 0.6225]]]])
    """
    flat = _flatten_spatial(x)
    d2 = (flat - flat.mean(-1, keepdim=True)).pow(2)
    var = d2.sum(-1, keepdim=True) / (flat.shape[-1] - 1)
    e = d2 / (4 * (var + lam)) + 0.5
    return torch.sigmoid(e).view_as(x)


def qada_attention(
    x: Tensor,
    delta: Tensor | None = None,
    step: Tensor | float | None = None,
    gamma: float = 1.0,
    kappa: float = 1e-6,
) -> Tensor:
    """Q-ADA saliency attention ``sigmoid(log(1+z²) + γ·log(1+r²))`` over the spatial axes.

    Args:
        x: features of shape (N, C, *spatial) with at least two spatial positions.
        delta: ``|x − Q(x)|`` shaped like ``x``; None means no quantizer (Δ = 0).
        step: the quantizer step s_c, a scalar or one value per channel (C,); None means σ_c.
        gamma: weight of the quantization-residual term.
        kappa: κ, keeps the divisions finite.

    Returns:
        A tensor shaped like ``x`` with values in [0.5, 1).

    Example:
        >>> a = qada_attention(torch.randn(2, 3, 4, 4))
        >>> bool((a >= 0.5).all())
        True
    """
    flat = _flatten_spatial(x)
    mu = flat.mean(-1, keepdim=True)
    sigma = flat.var(-1, unbiased=True, keepdim=True).sqrt()
    z = (flat - mu).abs() / (sigma + kappa)
    s = torch.log1p(z.pow(2))
    if delta is not None:
        s_c = sigma if step is None else _per_channel(step, x)
        r = delta.reshape(flat.shape) / (s_c + kappa)
        s = s + gamma * torch.log1p(r.pow(2))
    return torch.sigmoid(s).view_as(x)


def spatial_distribution(a: Tensor) -> Tensor:
    """Normalize non-negative attention ``a`` (N, C, *spatial) to sum to one over the spatial axes.

    Returns:
        Shape (N, C, S) with S the number of spatial positions.

    Example:
        >>> spatial_distribution(torch.ones(1, 1, 2, 2))
        tensor([[[0.2500, 0.2500, 0.2500, 0.2500]]])
    """
    flat = _flatten_spatial(a)
    return flat / flat.sum(-1, keepdim=True)


def kl_divergence(p: Tensor, r: Tensor) -> Tensor:
    """``KL(p ‖ r) = Σ p (log p − log r)`` over the last axis (logs floored at 1e-12).

    Example:
        >>> p = torch.tensor([0.5, 0.5])
        >>> kl_divergence(p, p)
        tensor(0.)
    """
    return (p * (p.clamp_min(_LOG_FLOOR).log() - r.clamp_min(_LOG_FLOOR).log())).sum(-1)


def js_divergence(p: Tensor, r: Tensor) -> Tensor:
    """Jensen–Shannon ``½ KL(p ‖ m) + ½ KL(r ‖ m)``, ``m = ½(p + r)``, over the last axis.

    It is symmetric and exactly zero when ``p == r`` (then ``m == p`` bit for bit).

    Example:
        >>> p, r = torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])
        >>> bool(js_divergence(p, r) == js_divergence(r, p))
        True
    """
    m = 0.5 * (p + r)
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(r, m)


_DIVERGENCE_FNS = {"kl": kl_divergence, "js": js_divergence}


class ADALoss(nn.Module):
    """Attention-distribution distillation from a frozen teacher to a student at named sites.

    Features are captured by forward hooks at module paths: the site module's *output*.
    ``forward(*inputs)`` runs the teacher (eval mode, ``torch.no_grad``) on the same inputs and
    compares its features with those the student produced in its most recent forward.

    The hooks are small picklable objects: the student can be saved (``torch.save``, pickle) and
    deep-copied (e.g. for an EMA) while ADA is attached. A copy's hooks are inert: cut off from
    this loss, they return at once, so a copy's forwards never feed (or corrupt) the loss.
    :meth:`remove` takes the hooks off both models; :func:`detach_ada` takes them, live or inert,
    off any model, and :func:`fxfusion.deploy` calls it on the model it deploys.

    Args:
        student: the model being trained (may be wrapped in DistributedDataParallel/DataParallel;
            paths are resolved inside the wrapper).
        teacher: the frozen full-precision model. It is put in eval mode and its parameters get
            ``requires_grad=False``. It is not registered as a submodule (nor is the student), so
            the loss has no parameters and no state_dict entries.
        sites: None for every GABFusion path of the student (the same path must exist in the
            teacher); a list of paths present in both models; or a dict
            ``{student_path: teacher_path}``.
        attention: ``"simam"`` (v1) or ``"q-ada"`` (v2).
        divergence: ``"kl"`` for KL(P_teacher ‖ R_student), or ``"js"``.
        weight: the factor on the loss (paper: 0.01).
        lam: SimAM's λ.
        gamma: Q-ADA's γ on the quantization-residual term.
        kappa: Q-ADA's κ.
        quantizers: Q-ADA only: ``{student_site: quantizer}`` with the quantizer (a module, or its
            path in the student) that consumes that site's output; or ``"auto"``: during the
            student's first forward, the first module with ``qparams()`` whose input *is* the
            site's output tensor (e.g. the ``act_quant`` of the consuming quantized conv). A
            quantizer is a module with a forward (fake-quantize) and ``qparams()`` returning an
            object with ``.scale``. Δ is computed by calling it on the teacher's and on the
            student's feature under ``no_grad``, in eval mode, with its buffers restored
            afterwards, so Δ is a constant w.r.t. autograd. Sites without a quantizer use
            s_c = σ_c and Δ = 0 (a warning lists them; :attr:`site_quantizers` shows the
            mapping).
        channel_dim: the feature axis of every site. None: a GABFusion site uses its ``dim``;
            otherwise 4-D+ features are (N, C, *spatial) and 3-D features are tokens (N, L, D),
            read with D as channels and L as the spatial axis.

    Example:
        >>> loss_fn = ADALoss(student, teacher, divergence="js")   # doctest: +SKIP
        >>> out = student(x)                                       # doctest: +SKIP
        >>> loss = task_loss(out, y) + loss_fn(x)                  # doctest: +SKIP
        >>> loss.backward()                                        # doctest: +SKIP
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        sites: Sequence[str] | Mapping[str, str] | None = None,
        attention: str = "simam",
        divergence: str = "kl",
        weight: float = 0.01,
        lam: float = 1e-4,
        gamma: float = 1.0,
        kappa: float = 1e-6,
        *,
        quantizers: Mapping[str, nn.Module | str] | str | None = None,
        channel_dim: int | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention={attention!r} is not one of {ATTENTIONS}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r} is not one of {DIVERGENCES}")
        for name, value, low in (("weight", weight, 0.0), ("gamma", gamma, 0.0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        for name, value in (("lam", lam), ("kappa", kappa)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0 (it keeps a division finite), got {value}")
        self.attention, self.divergence = attention, divergence
        self.weight, self.lam, self.gamma, self.kappa = weight, lam, gamma, kappa
        self.channel_dim = channel_dim
        # A tuple keeps both models out of nn.Module registration (no .to(), no state_dict).
        self._models = (student, teacher)
        s_root, t_root = unwrap(student), unwrap(teacher)
        self.sites: dict[str, str] = _resolve_sites(s_root, t_root, sites)
        auto = quantizers == "auto"
        if isinstance(quantizers, str) and not auto:
            raise ValueError(f"quantizers={quantizers!r}: pass 'auto', None or {{site: quantizer module or path}}")
        self.site_quantizers: dict[str, nn.Module | None] = _resolve_quantizers(
            s_root, self.sites, quantizers if attention == "q-ada" and not auto else None
        )
        self._store = _Store(self.site_quantizers)
        self._discovery: list[RemovableHandle] = []
        if attention == "q-ada" and auto:
            for m in s_root.modules():
                if callable(getattr(m, "qparams", None)):
                    self._discovery.append(m.register_forward_pre_hook(_Discover(self._store)))
            if not self._discovery:
                self._warn_missing("the student has no module with qparams()")
        elif attention == "q-ada":
            self._warn_missing("no quantizer given")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        s_modules, t_modules = dict(s_root.named_modules()), dict(t_root.named_modules())
        self._site_modules: dict[str, nn.Module] = {s: s_modules[s] for s in self.sites}
        self._handles: list[RemovableHandle] = []
        for s_path, t_path in self.sites.items():
            self._handles.append(s_modules[s_path].register_forward_hook(_Capture(self._store, "student", s_path)))
            self._handles.append(t_modules[t_path].register_forward_hook(_Capture(self._store, "teacher", s_path)))
        self._last: dict[str, Tensor] = {}

    @property
    def last_per_site(self) -> dict[str, float]:
        """``{site: divergence}`` of the last call, before the mean over sites and ``weight``."""
        return {s: float(d) for s, d in self._last.items()}

    @property
    def student(self) -> nn.Module:
        return self._models[0]

    @property
    def teacher(self) -> nn.Module:
        return self._models[1]

    def forward(self, *inputs: Any, **kwargs: Any) -> Tensor:
        """Run the teacher on ``inputs`` and return ``weight · L_ADA`` against the last student run."""
        store = self._store
        not_run = [s for s in self.sites if s not in store.student]
        if not_run:
            raise RuntimeError(
                f"ADALoss: no student features for sites {not_run}: run the student forward on the "
                "same inputs before each ADALoss call (features are consumed by every call)"
            )
        if self._discovery:  # quantizers="auto": the student's first forward has shown the consumers
            for h in self._discovery:
                h.remove()
            self._discovery.clear()
            self._warn_missing("no quantizer consumes the site output directly")
        student_feats = dict(store.student)
        store.student.clear()
        store.teacher.clear()
        self.teacher.eval()
        with torch.no_grad():
            self.teacher(*inputs, **kwargs)
        teacher_feats = dict(store.teacher)
        store.teacher.clear()
        missing = [s for s in self.sites if s not in teacher_feats]
        if missing:
            raise RuntimeError(f"ADALoss: the teacher's forward did not reach sites {missing} (teacher paths "
                               f"{[self.sites[s] for s in missing]})")
        per_site = [self._site_divergence(s, teacher_feats[s], student_feats[s]) for s in self.sites]
        # Kept as tensors: converting here would force a device sync on every training step.
        self._last = {s: d.detach() for s, d in zip(self.sites, per_site, strict=True)}
        return self.weight * torch.stack(per_site).mean()

    def remove(self) -> None:
        """Remove the forward hooks from both models (the loss is unusable afterwards)."""
        for h in self._handles + self._discovery:
            h.remove()
        self._handles.clear()
        self._discovery.clear()

    def _warn_missing(self, why: str) -> None:
        missing = [s for s, q in self.site_quantizers.items() if q is None]
        if missing:
            warnings.warn(f"ADALoss(attention='q-ada'): {why} for sites {missing}; they use s_c = σ_c and "
                          "Δ = 0 (pass quantizers={site: module} to use the real step)", stacklevel=3)

    def extra_repr(self) -> str:
        return (f"attention={self.attention}, divergence={self.divergence}, weight={self.weight}, "
                f"sites={len(self.sites)}")

    def _site_divergence(self, site: str, t: Tensor, s: Tensor) -> Tensor:
        # Our invariant, not user input: the teacher ran under no_grad.
        assert t.grad_fn is None and not t.requires_grad, f"teacher feature at {site!r} carries a graph"
        if t.shape != s.shape:
            raise ValueError(f"ADALoss site {site!r}: teacher feature {tuple(t.shape)} and student feature "
                             f"{tuple(s.shape)} differ; map sites with equal shapes (sites={{student: teacher}})")
        cdim = self._channel_dim(site, s)
        if s.numel() // (s.shape[0] * s.shape[cdim]) < 2:
            raise ValueError(f"ADALoss site {site!r}: feature {tuple(s.shape)} with channel axis {cdim} has fewer "
                             "than 2 spatial positions; a spatial attention distribution needs at least 2")
        p = spatial_distribution(self._attend(site, _upcast(t), cdim))
        r = spatial_distribution(self._attend(site, _upcast(s), cdim))
        return _DIVERGENCE_FNS[self.divergence](p, r).mean()

    def _attend(self, site: str, x: Tensor, cdim: int) -> Tensor:
        xc = _channels_first(x, cdim)
        if self.attention == "simam":
            return simam_attention(xc, self.lam)
        q = self.site_quantizers.get(site)
        if q is None:
            return qada_attention(xc, None, None, self.gamma, self.kappa)
        # The quantizer sees the feature in its own layout (its per-channel scale follows cdim).
        delta, step = _quantization_residual(q, x, site, cdim)
        return qada_attention(xc, _channels_first(delta, cdim), step, self.gamma, self.kappa)

    def _channel_dim(self, site: str, x: Tensor) -> int:
        m = self._site_modules[site]
        explicit = self.channel_dim if self.channel_dim is not None else getattr(m, "dim", None)
        if self.channel_dim is not None or isinstance(m, GABFusion):
            cdim = explicit % x.dim()
            if cdim == 0:
                raise ValueError(f"ADALoss site {site!r}: the feature axis cannot be the batch axis 0 "
                                 f"(feature {tuple(x.shape)}); pass channel_dim=")
            return cdim
        if x.dim() == 3:
            return 2  # tokens (N, L, D): D is the feature axis, L the spatial one
        if x.dim() >= 4:
            return 1
        raise ValueError(f"ADALoss site {site!r}: feature of shape {tuple(x.shape)} has no spatial axis; "
                         "ADA needs (N, C, *spatial) or tokens (N, L, D)")


def detach_ada(model: nn.Module) -> int:
    """Remove every ADALoss hook (live, or inert in a copy) from ``model``; return how many.

    A live ADALoss whose hooks are removed this way raises at its next call, as after :meth:`ADALoss.remove`.
    """
    removed = 0
    for m in model.modules():
        for hooks, extras in ((m._forward_hooks, (m._forward_hooks_with_kwargs, m._forward_hooks_always_called)),
                              (m._forward_pre_hooks, (m._forward_pre_hooks_with_kwargs,))):
            for hook_id in [i for i, h in hooks.items() if isinstance(h, _ADAHook)]:
                del hooks[hook_id]
                for extra in extras:
                    extra.pop(hook_id, None)
                removed += 1
    return removed


class _Store:
    """One ADALoss's features of the current step, per site, and its site quantizers (filled by "auto")."""

    def __init__(self, quantizers: dict[str, nn.Module | None]) -> None:
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self.quantizers = quantizers


class _ADAHook:
    """Base of ADALoss's hooks. A copy (deepcopy, pickle) gets no store: it is inert and pickles small."""

    store: _Store | None

    def __getstate__(self) -> dict:
        return {**vars(self), "store": None}


class _Capture(_ADAHook):
    """Forward hook: the site module's output goes to ``store.<side>[site]``."""

    def __init__(self, store: _Store, side: str, site: str) -> None:
        self.store, self.side, self.site = store, side, site

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.store is None:
            return
        if not isinstance(output, Tensor):
            raise TypeError(f"ADALoss site {self.site!r}: the module returned {type(output).__name__}, not a "
                            "Tensor; choose a site whose output is one feature tensor")
        getattr(self.store, self.side)[self.site] = output


class _Discover(_ADAHook):
    """Forward pre-hook (``quantizers="auto"``): a quantizer whose input is a site's output serves that site."""

    def __init__(self, store: _Store) -> None:
        self.store = store

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.store is None or not args or not isinstance(args[0], Tensor):
            return
        for site, feat in self.store.student.items():
            if self.store.quantizers[site] is None and args[0] is feat:
                self.store.quantizers[site] = module  # the first consumer in execution order



def _resolve_sites(
    student: nn.Module, teacher: nn.Module, sites: Sequence[str] | Mapping[str, str] | None
) -> dict[str, str]:
    s_names = [n for n, _ in student.named_modules()]
    t_names = [n for n, _ in teacher.named_modules()]
    if sites is None:
        paths = [n for n, m in student.named_modules() if isinstance(m, GABFusion)]
        if not paths:
            raise ValueError("ADALoss(sites=None) uses the student's GABFusion modules, but it has none; "
                             "rewrite the student first or pass sites=[module paths]")
        pairs = {p: p for p in paths}
    elif isinstance(sites, Mapping):
        pairs = dict(sites)
    elif isinstance(sites, str):
        raise TypeError(f"sites must be a list of paths or a dict, got the string {sites!r}; use sites=[{sites!r}]")
    else:
        pairs = {p: p for p in sites}
    if not pairs:
        raise ValueError("ADALoss needs at least one site, got an empty sites=")
    problems = []
    s_set, t_set = set(s_names), set(t_names)
    for side, paths, known, names in (("student", pairs.keys(), s_set, s_names),
                                      ("teacher", pairs.values(), t_set, t_names)):
        for path in paths:
            if path not in known or path == "":
                close = difflib.get_close_matches(path, [n for n in names if n], n=3, cutoff=0.5)
                problems.append(f"{path!r} is not a submodule of the {side}" +
                                (f" (close matches: {close})" if close else ""))
    if problems:
        raise ValueError("ADALoss sites: " + "; ".join(problems) +
                         ". Pass sites=[...] present in both models, or sites={student_path: teacher_path}")
    return pairs


def _resolve_quantizers(
    student: nn.Module, sites: Mapping[str, str], quantizers: Mapping[str, nn.Module | str] | None
) -> dict[str, nn.Module | None]:
    out: dict[str, nn.Module | None] = {s: None for s in sites}
    if not quantizers:
        return out
    modules = dict(student.named_modules())
    for site, given in quantizers.items():
        q = given
        if site not in out:
            raise ValueError(f"quantizers key {site!r} is not an ADA site; sites are {list(out)}")
        if isinstance(q, str):
            if q not in modules:
                close = difflib.get_close_matches(q, list(modules), n=3, cutoff=0.5)
                raise ValueError(f"quantizer path {q!r} for site {site!r} is not a submodule of the student"
                                 + (f" (close matches: {close})" if close else ""))
            q = modules[q]
        if not isinstance(q, nn.Module) or not callable(getattr(q, "qparams", None)):
            raise TypeError(f"quantizer for site {site!r} must be an nn.Module with qparams() (returning an "
                            f"object with .scale), got {type(q).__name__}")
        out[site] = q
    return out


def _quantization_residual(q: nn.Module, x: Tensor, site: str, cdim: int) -> tuple[Tensor, Tensor]:
    """Δ = |x − Q(x)| (x's layout) and the step s_c (1 or C values), both constants."""
    was_training = q.training
    saved = [(b, b.detach().clone()) for b in q.buffers()]
    try:
        q.eval()
        with torch.no_grad():
            xq = q(x)
            step = q.qparams().scale
    finally:
        # Calling the quantizer a second time must not move its observers or init flags.
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        q.train(was_training)
    if not isinstance(xq, Tensor) or xq.shape != x.shape:
        raise ValueError(f"quantizer at site {site!r} returned {getattr(xq, 'shape', type(xq))} for input "
                         f"{tuple(x.shape)}; it must fake-quantize elementwise")
    step = torch.as_tensor(step, dtype=x.dtype, device=x.device).detach()
    if step.numel() not in (1, x.shape[cdim]):
        raise ValueError(f"quantizer at site {site!r}: scale has {step.numel()} values, expected 1 or one per "
                         f"channel ({x.shape[cdim]})")
    return (x - xq.to(x.dtype)).abs(), step


def _per_channel(step: Tensor | float, x: Tensor) -> Tensor:
    step = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    if step.numel() == 1:
        return step.reshape(1, 1, 1)
    if step.numel() != x.shape[1]:
        raise ValueError(f"step has {step.numel()} values; expected 1 or one per channel ({x.shape[1]})")
    return step.reshape(1, -1, 1)


def _flatten_spatial(x: Tensor) -> Tensor:
    if x.dim() < 3:
        raise ValueError(f"expected (N, C, *spatial) features, got shape {tuple(x.shape)}")
    if x[0, 0].numel() < 2:
        raise ValueError(f"features {tuple(x.shape)} have fewer than 2 spatial positions per channel")
    return x.reshape(x.shape[0], x.shape[1], -1)


def _upcast(x: Tensor) -> Tensor:
    # Logs and normalizations of 16-bit features (autocast) lose too much; float32 is enough.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _channels_first(x: Tensor, cdim: int) -> Tensor:
    return x if cdim == 1 else x.movedim(cdim, 1)
