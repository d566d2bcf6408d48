"""Per-branch gradient norms at fusion sites: the imbalance measurement of arXiv 2511.05898.

For every site and branch i, on every batch b, with L_b = ``loss_fn(model, batch_b)``::

    G_{i,b} = ||∂L_b/∂x_i||₂

where x_i is the i-th tensor the site module receives (for GABFusion: the unscaled branch
F̃_i). Only the gradient that flows *through the site* is counted: each input is replaced by an
alias (``x.view_as(x)``) whose hook sees nothing from the branch's other consumers. A module
called several times in one forward adds up: G_{i,b} = sqrt(Σ_calls ||g||²).

Reported per (site, branch): ``mean_b G``, ``std_b G`` (sample std, n − 1; 0 for one batch), and
per site ``ratio = max_i mean / min_i mean``. Full-precision models show ratios near the
architecture's baseline; the paper's point is that 4-bit QAT widens them.

The model is left as it was found: training flags, all buffers (BatchNorm statistics, quantizer
observers, GABFusion energies) and the parameters' ``.grad`` are restored. No optimizer runs.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fxfusion.gabfusion import GABFusion
from fxfusion.passes.runtime import unwrap

__all__ = ["GradientProfile", "profile_gradients"]


@dataclass
class GradientProfile:
    """Gradient-norm statistics per fusion site and branch.

    Attributes:
        rows: one dict per (site, branch) with keys ``site``, ``branch`` (input index),
            ``shape``, ``mean``, ``std``, ``batches`` (batches in which the branch got a
            gradient) and ``ratio`` (the site's max/min branch mean, repeated on each row).
            ``mean``/``std``/``ratio`` are NaN when a branch never received a gradient.

    Example:
        >>> prof = profile_gradients(model, loss_fn, batches)   # doctest: +SKIP
        >>> print(prof); prof.plot("imbalance.png")             # doctest: +SKIP
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ratios(self) -> dict[str, float]:
        """``{site: max/min of the branch means}``."""
        return {r["site"]: r["ratio"] for r in self.rows}

    def to_json(self, indent: int | None = 2) -> str:
        """Serialise the rows as JSON (NaN written as null)."""
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                 for r in self.rows]
        return json.dumps({"rows": clean}, indent=indent)

    def __str__(self) -> str:
        head = ("site", "branch", "shape", "mean |dL/dx|", "std", "max/min", "batches")
        body = [(r["site"], str(r["branch"]), "x".join(map(str, r["shape"])), _num(r["mean"]), _num(r["std"]),
                 _num(r["ratio"]), str(r["batches"])) for r in self.rows]
        widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]

        def line(row: tuple[str, ...]) -> str:  # text columns left-aligned, numbers right-aligned
            cells = zip(row, widths, strict=True)
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(cells))

        lines = [line(row) for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Write a PNG bar chart: one group per site, one bar per branch (log scale, ±std).

        Raises:
            ImportError: matplotlib is missing (``pip install "fxfusion[demo]"``).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError('GradientProfile.plot needs matplotlib: pip install "fxfusion[demo]"') from e
        sites = list(dict.fromkeys(r["site"] for r in self.rows))
        k_max = max((sum(r["site"] == s for r in self.rows) for s in sites), default=1)
        width = 0.8 / k_max
        fig = Figure(figsize=(max(4.0, 1.2 * len(sites) + 2), 3.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for b in range(k_max):
            rows = [next((r for r in self.rows if r["site"] == s and r["branch"] == b), None) for s in sites]
            xs = [i + (b - (k_max - 1) / 2) * width for i, r in enumerate(rows) if r is not None]
            ys = [_finite(r["mean"]) for r in rows if r is not None]
            es = [_finite(r["std"]) for r in rows if r is not None]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=f"branch {b}")
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels(sites, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("mean ||dL/dx_i||")
        if any(_finite(r["mean"]) > 0 for r in self.rows):
            ax.set_yscale("log")
        ax.set_title("Gradient norm per fusion branch")
        ax.legend(fontsize=8)
        fig.tight_layout()
        # Write beside the target, then rename: a failure leaves no half-written file.
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=120)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def profile_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Iterable[Any],
    sites: Sequence[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    *,
    train: bool | None = True,
) -> GradientProfile:
    """Measure ||∂L/∂x_i|| per fusion site and branch over ``batches``.

    Args:
        model: any model. Wrappers (DistributedDataParallel, DataParallel) are looked through
            for the site paths.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; it runs the forward itself.
        batches: an iterable of whatever ``loss_fn`` takes.
        sites: module paths whose forward receives the branches, either as separate tensor
            arguments or as one list/tuple (YOLO's ``Concat``). None: every GABFusion module.
        plot: a PNG path to write the bar chart to.
        train: put the model in train mode (True, the QAT setting) or eval mode (False) while
            profiling, or leave it as it is (None). The previous flags are restored.

    Returns:
        A :class:`GradientProfile`.

    Example:
        >>> prof = profile_gradients(model, lambda m, b: crit(m(b[0]), b[1]), loader,
        ...                          sites=["model.12", "model.16"])  # doctest: +SKIP
        >>> prof.ratios                                                 # doctest: +SKIP
    """
    root = unwrap(model)
    modules = dict(root.named_modules())
    paths = _resolve_sites(root, modules, sites)
    # Per batch: site → branch → accumulated ||g||²; across batches: site → branch → [G_b].
    current: dict[str, dict[int, float]] = {p: {} for p in paths}
    norms: dict[str, dict[int, list[float]]] = {p: {} for p in paths}
    shapes: dict[str, dict[int, tuple[int, ...]]] = {p: {} for p in paths}

    flags = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # GABFusion's rank-local gradient energy is a plain tensor attribute, not a buffer
    buffers += [(m.grad_energy, m.grad_energy.clone()) for m in model.modules() if isinstance(m, GABFusion)]
    grads = {p: p.grad for p in model.parameters()}
    handles = [modules[p].register_forward_pre_hook(_alias_inputs(p, current[p], shapes[p])) for p in paths]
    try:
        if train is not None:
            model.train(train)
        for p in grads:
            p.grad = None
        n_batches = 0
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ValueError("profile_gradients: loss_fn(model, batch) must return a scalar tensor that "
                                     f"requires grad, got {type(loss).__name__}"
                                     + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
                loss.reshape(()).backward()
                for p in paths:
                    for i, e in current[p].items():
                        norms[p].setdefault(i, []).append(math.sqrt(e))
                    current[p].clear()
                for p in grads:
                    p.grad = None
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        for m, t in flags.items():
            m.training = t
        for p, g in grads.items():
            p.grad = g
    if n_batches == 0:
        raise ValueError("profile_gradients: batches was empty")
    never = [p for p in paths if not shapes[p]]
    if never:
        raise ValueError(f"profile_gradients: sites {never} were never called during the forward passes; "
                         "check the paths (they must be modules whose forward takes the branches)")
    prof = GradientProfile(_rows(paths, norms, shapes))
    if plot is not None:
        prof.plot(plot)
    return prof


def _alias_inputs(site: str, acc: dict[int, float], shapes: dict[int, tuple[int, ...]]):
    def record(i: int, g: Tensor) -> None:
        acc[i] = acc.get(i, 0.0) + float(g.detach().double().pow(2).sum())

    def alias(i: int, x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        shapes.setdefault(i, tuple(x.shape))
        if not (x.requires_grad and torch.is_grad_enabled()):
            return x
        y = x.view_as(x)  # a fresh autograd node: its hook sees only this site's gradient
        y.register_hook(lambda g: record(i, g))
        return y

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            seq = args[0]
            return (type(seq)(alias(i, x) for i, x in enumerate(seq)),)
        if not any(isinstance(a, Tensor) for a in args):
            raise TypeError(f"profile_gradients site {site!r}: its forward received no tensors "
                            f"({[type(a).__name__ for a in args]}); pick a module that takes the branches")
        return tuple(alias(i, x) for i, x in enumerate(args))

    return hook


def _rows(
    paths: list[str], norms: dict[str, dict[int, list[float]]], shapes: dict[str, dict[int, tuple[int, ...]]]
) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        stats = {}
        for i in sorted(shapes[p]):
            vals = norms[p].get(i, [])
            n = len(vals)
            mean = sum(vals) / n if n else math.nan
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else (0.0 if n else math.nan)
            stats[i] = (mean, std, n)
        means = [m for m, _, _ in stats.values()]
        ratio = (max(means) / min(means)) if means and all(m > 0 for m in means) else math.nan
        for i, (mean, std, n) in stats.items():
            rows.append({"site": p, "branch": i, "shape": list(shapes[p][i]), "mean": mean, "std": std,
                         "ratio": ratio, "batches": n})
    return rows


def _resolve_sites(root: nn.Module, modules: dict[str, nn.Module], sites: Sequence[str] | None) -> list[str]:
    if sites is None:
        paths = [n for n, m in modules.items() if isinstance(m, GABFusion)]
        if not paths:
            raise ValueError("profile_gradients(sites=None) profiles GABFusion modules, but the model has none; "
                             "pass sites=[paths of the modules that fuse the branches] (e.g. YOLO Concat paths)")
        return paths
    if isinstance(sites, str):
        raise TypeError(f"sites must be a list of module paths, got the string {sites!r}; use sites=[{sites!r}]")
    missing = [s for s in sites if s not in modules or s == ""]
    if missing:
        hints = {s: difflib.get_close_matches(s, [n for n in modules if n], n=3, cutoff=0.5) for s in missing}
        raise ValueError(f"profile_gradients: {missing} are not submodules of {type(root).__name__}"
                         f" (close matches: {hints})")
    return list(dict.fromkeys(sites))



def _num(v: float) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"


def _finite(v: float) -> float:
    return 0.0 if math.isnan(v) else v
