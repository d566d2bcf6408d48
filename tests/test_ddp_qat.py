"""Distributed QAT: DistributedDataParallel over a rewritten, quantized zoo model with ADA and balanced α.

Two processes (gloo, CPU, one thread each), each on its own data. The model is wrapped before any
forward, so its quantizers initialize lazily inside the first DDP forward, and every step
accumulates two micro-batches. After the run, every entry of the state_dict (weights, LSQ steps,
``initialized`` flags, the balanced sites' λ and Ḡ) must be bit-identical on both ranks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from ddp_util import gloo_group, spawn  # tests/ddp_util.py
from torch import nn

import fxfusion
from fxfusion import zoo
from fxfusion.gabfusion import set_gate

WORLD, STEPS, MICRO_BATCHES = 2, 3, 2


def _models() -> tuple[nn.Module, nn.Module]:
    """The QAT student (balanced α, LSQ W4A4) and its float teacher, identical on every rank."""
    torch.manual_seed(0)
    fp = zoo.build("yolov5")
    (x,) = zoo.example_inputs("yolov5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = fxfusion.rewrite(fp, x, alpha="balanced", fold="any")
        student = fxfusion.quantize(rewritten, x, method="lsq", w_bits=4, a_bits=4)
        set_gate(student, 1.0)  # as NormSchedule has it at its peak: the sites normalize and α gets gradients
        # α = 1 and no norm: the float model's outputs, under the student's site paths
        teacher = fxfusion.rewrite(fp, x, alpha="fixed", alpha_init=1.0, norm="none", fold="any")
    return student, teacher


def _worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_method):
        student, teacher = _models()
        student.train()
        ddp = nn.parallel.DistributedDataParallel(student)
        ada = fxfusion.ADALoss(ddp, teacher)
        balancer = fxfusion.AlphaBalancer(ddp)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        sites = list(balancer.modules.values())
        first_batch, energy_kept = None, True
        for _ in range(STEPS):
            opt.zero_grad()
            for _ in range(MICRO_BATCHES):  # gradient accumulation, all-reducing after every backward
                x = torch.randn(2, 3, 64, 64, generator=gen)
                first_batch = x if first_batch is None else first_batch
                before = [m.grad_energy.clone() for m in sites]
                out = ddp(x)
                # DDP broadcasts rank 0's buffers before a forward: the local energies must survive it
                energy_kept &= all(torch.equal(b, m.grad_energy) for b, m in zip(before, sites))
                loss = sum(o.pow(2).mean() for o in out) + ada(x)  # Detect's 3 raw maps in train mode
                (loss / MICRO_BATCHES).backward()
            opt.step()
            balancer.step()
            torch.save({"state": student.state_dict(), "alpha": {s: h[-1] for s, h in balancer.history.items()},
                    "energy_kept": energy_kept, "first_batch": first_batch}, Path(out_dir) / f"rank{rank}.pt")


def test_ranks_stay_bit_identical(tmp_path):
    spawn(_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # the ranks saw different data
    assert all(r["energy_kept"] for r in ranks), "a DDP forward overwrote the rank-local gradient energies"

    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys()
    differ = [k for k in state0 if not torch.equal(state0[k], state1[k])]
    assert not differ, f"differ across ranks: {differ}"
    assert ranks[0]["alpha"] == ranks[1]["alpha"]

    # what was compared: weights, quantizer parameters (all initialized), and balanced α that moved
    initial, _ = _models()
    start = initial.state_dict()
    steps = [k for k in state0 if k.endswith("_quant.step")]
    assert len(steps) == 2 * sum(k.endswith("weight_quant.step") for k in state0) > 0
    assert all(bool(v) for k, v in state0.items() if k.endswith("initialized"))
    assert all(not torch.equal(state0[k], start[k]) for k in steps if "act_quant" in k)
    assert not torch.equal(state0["model.0.conv.weight"], start["model.0.conv.weight"])
    alpha, ops = ranks[0]["alpha"], {n: m.op for n, m in initial.named_modules() if isinstance(m, fxfusion.GABFusion)}
    assert alpha.keys() == ops.keys() and len(alpha) == zoo.ZOO["yolov5"].expected_sites
    # a cat's branches get different gradients; an add's equally scaled branches get the same one
    assert all((alpha[s] != [0.5, 0.5]) == (ops[s] == "cat") for s in alpha if len(alpha[s]) == 2)
