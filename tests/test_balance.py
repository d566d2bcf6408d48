"""AlphaBalancer: the v2 closed-loop α controller, single process and under DDP (gloo, CPU)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.distributed as dist
from ddp_util import gloo_group, spawn  # tests/ddp_util.py
from torch import nn

from fxfusion.balance import AlphaBalancer
from fxfusion.gabfusion import GABFusion


class Toy(nn.Module):
    """Two identical branches; the head reads the deep branch's channels with 10× the weight.

    With ``norm="none"`` the gradient norms are G_deep / G_shallow = 10 · α_deep / α_shallow
    exactly, so at α = (½, ½) the gap is 10× and the balanced point is α_shallow = 10/11.
    """

    def __init__(self, norm: str = "none", tied: bool = True) -> None:
        super().__init__()
        self.shallow = nn.Linear(8, 4)
        self.deep = nn.Linear(8, 4)
        if tied:  # untied branches make the gap depend on the data
            self.deep.load_state_dict(self.shallow.state_dict())
        self.fuse = GABFusion("cat", 2, dim=1, alpha="balanced", norm=norm)
        self.head = nn.Linear(8, 1, bias=False)
        with torch.no_grad():
            self.head.weight[:, 4:] = 10 * self.head.weight[:, :4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fuse(self.shallow(x), self.deep(x)))


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()


def test_first_step_matches_hand_update():
    torch.manual_seed(0)
    m = Toy()
    bal = AlphaBalancer(m, beta=0.1, eta=0.05)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    _backward(m, x, y)
    energy = m.fuse.grad_energy.clone()
    assert torch.allclose(energy[1] / energy[0], torch.tensor(100.0), rtol=1e-4)  # G ratio 10
    bal.step()
    g = energy.double().sqrt()
    log_g = (g + 1e-12).log()
    e = log_g - log_g.mean()
    assert torch.allclose(m.fuse.energy_ema.double(), g, rtol=1e-6)  # Ḡ initialised with G
    assert torch.allclose(m.fuse.dual_logits.double(), -0.05 * e, atol=1e-7)
    assert torch.equal(m.fuse.grad_energy, torch.zeros(2))
    # Second step: EMA with β.
    _backward(m, x, y)
    g2 = m.fuse.grad_energy.clone().double().sqrt()
    lam_before = m.fuse.dual_logits.clone().double()
    bal.step()
    ema = 0.9 * g + 0.1 * g2
    assert torch.allclose(m.fuse.energy_ema.double(), ema, rtol=1e-6)
    log_ema = (ema + 1e-12).log()
    assert torch.allclose(m.fuse.dual_logits.double(), lam_before - 0.05 * (log_ema - log_ema.mean()), atol=1e-7)


def test_balances_a_10x_gap():
    """Quantity: r_t = G_deep/G_shallow of step t. Requirement: |log r_t| ≤ log 1.1 (norms within
    10% of each other) for every step from some t* ≤ 100 to the end of a 200-step run."""
    torch.manual_seed(0)
    m = Toy()
    bal = AlphaBalancer(m)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(200):
        _backward(m, x, y)
        bal.step()
    g = torch.tensor(bal.energy_history["fuse"])
    log_r = (g[:, 1] / g[:, 0]).log()
    assert math.isclose(log_r[0].item(), math.log(10), rel_tol=1e-4)
    bad = (log_r.abs() > math.log(1.1)).nonzero()
    settle = int(bad.max()) + 1
    assert settle <= 100, f"still outside 10% at step {settle - 1}"
    alphas = torch.tensor(bal.history["fuse"])  # (201, 2): α at construction, then after each step
    assert alphas.shape == (201, 2)
    assert alphas[0].tolist() == [0.5, 0.5]
    assert alphas[-1, 0].item() == pytest.approx(10 / 11, abs=2e-3)  # the balanced point
    assert bool((alphas[1:, 0] > 0.5).all())  # the under-trained shallow branch gains weight
    assert torch.allclose(alphas.sum(1), torch.ones(201))


def test_no_backward_skips_and_says_so():
    m = Toy()
    bal = AlphaBalancer(m)
    with pytest.warns(UserWarning, match="no gradient energy"):
        bal.step()
    assert "fuse" in bal.skipped
    assert torch.equal(m.fuse.dual_logits, torch.zeros(2))
    assert torch.equal(m.fuse.energy_ema, torch.zeros(2))


def test_tau_and_errors():
    m = Toy()
    with pytest.raises(ValueError, match="2 branches"):
        AlphaBalancer(m, tau=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="nope"):
        AlphaBalancer(m, tau={"nope": [0.0, 0.0]})
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no alpha='balanced'"):
        AlphaBalancer(plain)
    learned = nn.Sequential(GABFusion("add", 2, dim=1))
    with pytest.raises(ValueError, match="other alpha modes"):
        AlphaBalancer(learned)
    # τ shifts the target: with τ = (+t, −t) the controller settles at log-gap 2t, not 0.
    torch.manual_seed(0)
    m = Toy()
    bal = AlphaBalancer(m, tau=[0.2, -0.2], eta=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(300):
        _backward(m, x, y)
        bal.step()
    g = bal.energy_history["fuse"][-1]
    assert math.log(g[0] / g[1]) == pytest.approx(0.4, abs=1e-2)


# --- data parallel --------------------------------------------------------------------------


def _no_forward_buffer_sync() -> dict[str, bool]:
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _ddp_worker(rank: int, world: int, init_method: str, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_method):
        torch.manual_seed(0)  # same initial model on every rank
        model = Toy(norm="layernorm", tied=False)
        # No buffer sync at forward: rank 0's λ is NOT copied over, so a rank that updated
        # differently would stay different.
        ddp = nn.parallel.DistributedDataParallel(model, **_no_forward_buffer_sync())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        bal = AlphaBalancer(ddp)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        local_differs = []
        for _ in range(5):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            ((ddp(x) - y) ** 2).mean().backward()
            local = model.fuse.grad_energy.clone()
            gathered = [torch.zeros_like(local) for _ in range(world)]
            dist.all_gather(gathered, local)
            local_differs.append(not torch.equal(gathered[0], gathered[1]))
            opt.step()
            bal.step()
        lam = model.fuse.dual_logits.clone()
        lams = [torch.zeros_like(lam) for _ in range(world)]
        dist.all_gather(lams, lam)
        if rank == 0:
            torch.save({"lams": lams, "local_differs": local_differs, "history": bal.history["fuse"]}, out)


def test_ddp_ranks_apply_identical_updates(tmp_path):
    out = str(tmp_path / "ddp.pt")
    spawn(_ddp_worker, 2, out)
    res = torch.load(out)
    assert all(res["local_differs"])  # the ranks saw different energies...
    assert torch.equal(res["lams"][0], res["lams"][1])  # ...yet λ (hence α) is bit-identical
    assert res["history"][-1] != [0.5, 0.5]  # and it moved


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_energy_is_the_whole_branch_gradient_of_a_gated_site(mix: float) -> None:
    # A function-preserving site sends gradient into its branches through the plain fusion and the
    # normalized path; G_i must be all of it (at mix = 0 the normalized path carries none).
    torch.manual_seed(0)
    site = GABFusion("cat", 2, dim=1, channels=8, alpha="balanced", preserve=True, branch_channels=[4, 4])
    site.mix.fill_(mix)
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    w = torch.randn(8)
    (site(a, b) * w).pow(2).sum().backward()
    expected = torch.stack([a.grad.pow(2).sum(), b.grad.pow(2).sum()])
    assert torch.allclose(site.grad_energy, expected, rtol=1e-5) and bool((expected > 0).all())
