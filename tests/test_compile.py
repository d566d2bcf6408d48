"""torch.compile of a rewritten, quantized model: one graph, no graph break, no recompilation, and
eager's loss.

Dynamo's graph capture and guards do not depend on the backend, so a backend that only counts the
graphs it is handed (and runs them eagerly) checks what inductor would get, in a second. The
quantizers are initialized by one eager step first (see ``fxfusion.quantize``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxfusion

dynamo = pytest.importorskip("torch._dynamo")


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def _step(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), model(x).pow(2).mean().item()


@pytest.mark.slow  # inductor compiles C++ for ~40 s on 2 cores
def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxfusion.quantize(fxfusion.rewrite(_TwoBranch(), x), x, method="lsq")
    q.train()
    q(x)  # initialise the quantizers eagerly (their lazy init is a graph break under compile)
    eager, compiled = copy.deepcopy(q), copy.deepcopy(q)
    before_e, after_e = _step(eager, x)
    before_c, after_c = _step(torch.compile(compiled), x)
    assert abs(before_e - before_c) <= 1e-5 and abs(after_e - after_c) <= 1e-5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


@pytest.mark.parametrize("method", ["lsq", "pact", "dsq", "n2uq"])
def test_training_steps_compile_once_without_graph_breaks(method: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    fp = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = fxfusion.quantize(fxfusion.rewrite(fp, x, alpha="balanced", fold="any"), x, method=method)
        teacher = fxfusion.rewrite(fp, x, alpha="fixed", alpha_init=1.0, norm="none", fold="any")
    student.train()
    ada, balancer = fxfusion.ADALoss(student, teacher), fxfusion.AlphaBalancer(student)
    schedule = fxfusion.NormSchedule(student, total_steps=5, ramp=0.4, taper=0.4)  # the gate moves every step
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    def step(model: nn.Module) -> float:
        opt.zero_grad()
        loss = model(x).pow(2).mean() + ada(x)
        loss.backward()
        opt.step()
        balancer.step()
        schedule.step()
        return float(loss.detach())

    step(student)  # eager warm-up: the quantizers initialize on this batch
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = torch.compile(student, backend=counting_backend)
    losses = [step(compiled) for _ in range(4)]
    assert len(graphs) == 1, f"{len(graphs)} graphs: a recompilation or a graph break"
    assert not dynamo.utils.counters["graph_break"], dict(dynamo.utils.counters["graph_break"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert balancer.history and schedule.steps_done == 5
