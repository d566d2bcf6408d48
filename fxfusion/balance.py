"""Closed-loop α balancing for ``alpha="balanced"`` GABFusion sites (paper v2, arXiv 2511.05898).

Each balanced site holds dual logits λ ∈ R^K (α = softmax(λ)), an EMA Ḡ of the per-branch
gradient norms, and ``grad_energy``: Σ ||∂L/∂x_i||² accumulated by backward hooks over the
step (x_i the unscaled branch input). After the backward pass, for every site::

    G_i = sqrt(Σ_ranks grad_energy_i)          (the norm over the global batch)
    Ḡ   ← G                                     on the first step (Ḡ == 0)
    Ḡ   ← (1 − β) Ḡ + β G                       afterwards
    e_i = log(Ḡ_i + ε) − mean_j log(Ḡ_j + ε) − τ_i
    λ_i ← λ_i − η e_i
    grad_energy ← 0

A branch whose gradient energy is above the geometric mean gets a smaller α, so the
log-energies are driven together. There is no autograd through λ (it is a buffer; no
optimizer sees it) and no second-order gradient.

Data parallel: ``grad_energy`` is local to a rank (activation gradients are never
all-reduced), so the energies of all sites are summed across ranks with one ``all_reduce``
before the update; every rank then applies the identical update. Summing energies (rather than
averaging norms) gives the norm over the global batch; a common factor across branches does not
change e, which depends only on log-ratios.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fxfusion.gabfusion import GABFusion
from fxfusion.passes.runtime import unwrap

__all__ = ["AlphaBalancer"]


class AlphaBalancer:
    """Update the dual logits of every balanced GABFusion from the gradient energies of the step.

    Call :meth:`step` once per optimizer step, after ``loss.backward()`` (with gradient
    accumulation, after the last micro-batch: the energies add up). It reads only the energies
    recorded in backward, so it may run before or after ``optimizer.step()``; it must run before
    the next backward. Under torch.distributed every rank must call it (it is a collective).

    Args:
        model: a model containing GABFusion modules built with ``alpha="balanced"`` (may be
            wrapped in DistributedDataParallel; site names are taken inside the wrapper).
        beta: EMA factor β of Ḡ.
        eta: step size η on λ.
        tau: target log-energy offsets τ: None (all 0), one sequence applied to every site (its
            length must equal each site's branch count), or ``{site_path: sequence}``.
        eps: ε inside the logs.
        process_group: the group for the all-reduce (None: the default group).

    Attributes:
        sites: the balanced site paths, in model order.
        history: ``{site: [α at construction, α after step 1, ...]}`` as lists of floats.
        energy_history: ``{site: [G after step 1, ...]}``, the (all-reduced) per-step norms.
        skipped: ``{site: reason}`` for sites the last step left unchanged.

    Example:
        >>> balancer = AlphaBalancer(model)         # doctest: +SKIP
        >>> loss.backward()                         # doctest: +SKIP
        >>> optimizer.step(); balancer.step()       # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        beta: float = 0.1,
        eta: float = 0.05,
        tau: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
        eps: float = 1e-12,
        process_group: object | None = None,
    ) -> None:
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        root = unwrap(model)
        self.modules: dict[str, GABFusion] = {
            n: m for n, m in root.named_modules() if isinstance(m, GABFusion) and m.alpha_mode == "balanced"
        }
        if not self.modules:
            others = [n for n, m in root.named_modules() if isinstance(m, GABFusion)]
            hint = (f"its GABFusion modules {others} use other alpha modes" if others
                    else "it has no GABFusion modules")
            raise ValueError(f"AlphaBalancer found no alpha='balanced' GABFusion in the model ({hint}); "
                             "rewrite with balanced α, or drop the balancer")
        self.beta, self.eta, self.eps, self.process_group = beta, eta, eps, process_group
        self.sites = list(self.modules)
        self.tau = _resolve_tau(tau, self.modules)
        self.history: dict[str, list[list[float]]] = {
            s: [m.alpha().detach().tolist()] for s, m in self.modules.items()
        }
        self.energy_history: dict[str, list[list[float]]] = {s: [] for s in self.sites}
        self.skipped: dict[str, str] = {}
        self.steps = 0
        self._warned: set[str] = set()

    @torch.no_grad()
    def step(self) -> dict[str, Tensor]:
        """Apply one controller update to every balanced site and zero the recorded energies.

        Returns:
            ``{site: α}`` after the update.
        """
        mods = list(self.modules.values())
        energy = torch.cat([m.grad_energy.detach().double() for m in mods])
        energy = self._all_reduce(energy, mods[0].grad_energy.device)
        self.skipped = {}
        out: dict[str, Tensor] = {}
        offset = 0
        for site, m in self.modules.items():
            k = m.num_branches
            e_site = energy[offset:offset + k].to(m.energy_ema.device)
            offset += k
            reason = _skip_reason(e_site)
            if reason is None:
                self._update(site, m, e_site.sqrt())
                self.energy_history[site].append(e_site.sqrt().tolist())
            else:
                self.skipped[site] = reason
                if site not in self._warned:
                    self._warned.add(site)
                    warnings.warn(f"AlphaBalancer: site {site!r} left unchanged: {reason}", stacklevel=2)
            m.grad_energy.zero_()
            alpha = m.alpha().detach()
            self.history[site].append(alpha.tolist())
            out[site] = alpha
        self.steps += 1
        return out

    def _update(self, site: str, m: GABFusion, g: Tensor) -> None:
        ema = m.energy_ema
        g = g.to(ema.dtype)
        if bool((ema == 0).all()):
            ema.copy_(g)  # first step: Ḡ starts at G (a checkpointed Ḡ is nonzero and is kept)
        else:
            ema.mul_(1 - self.beta).add_(self.beta * g)
        log_g = (ema + self.eps).log()
        e = log_g - log_g.mean() - self.tau[site].to(log_g)
        m.dual_logits.sub_(self.eta * e.to(m.dual_logits.dtype))

    def _all_reduce(self, energy: Tensor, device: torch.device) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return energy
        # One collective for all sites; float64 so that summing many ranks loses nothing.
        buf = energy.to(device)
        if dist.get_backend(self.process_group) == "nccl" and buf.device.type == "cpu":
            buf = buf.cuda()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
        return buf.cpu()

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}: [{', '.join(f'{a:.3g}' for a in h[-1])}]" for s, h in self.history.items())
        return f"AlphaBalancer(beta={self.beta}, eta={self.eta}, steps={self.steps}, alpha={{{rows}}})"


def _skip_reason(energy: Tensor) -> str | None:
    if not bool(torch.isfinite(energy).all()):
        return f"non-finite gradient energy {energy.tolist()} (e.g. an AMP overflow step)"
    if bool((energy == 0).all()):
        return "no gradient energy recorded: call step() after loss.backward() in train mode"
    if bool((energy == 0).any()):
        dead = [i for i, v in enumerate(energy.tolist()) if v == 0]
        return f"branches {dead} received no gradient (inputs that do not require grad cannot be balanced)"
    return None


def _resolve_tau(
    tau: Sequence[float] | Mapping[str, Sequence[float]] | None, modules: Mapping[str, GABFusion]
) -> dict[str, Tensor]:
    out = {s: torch.zeros(m.num_branches, dtype=torch.float64) for s, m in modules.items()}
    if tau is None:
        return out
    if isinstance(tau, Mapping):
        unknown = [s for s in tau if s not in modules]
        if unknown:
            raise ValueError(f"tau names sites {unknown} that are not balanced GABFusion sites {list(modules)}")
        items = dict(tau)
    else:
        items = {s: tau for s in modules}
    for site, values in items.items():
        t = torch.as_tensor(values, dtype=torch.float64).flatten()
        if t.numel() != modules[site].num_branches:
            raise ValueError(f"tau for site {site!r} has {t.numel()} values, the site has "
                             f"{modules[site].num_branches} branches")
        out[site] = t
    return out

