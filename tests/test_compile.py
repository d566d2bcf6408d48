"""torch.compile: a rewritten, quantized model trains one step compiled, with eager's loss."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxfusion


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
