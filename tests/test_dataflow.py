"""The op table in passes/dataflow.py is the one place op semantics live: find, quantize and
deploy all read it, in both vocabularies (fx targets and autograd nodes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfusion
from fxfusion.passes import dataflow
from fxfusion.passes.dataflow import OpFacts, grad_fn_facts, grad_fn_name, nonneg


class CatAbs(nn.Module):
    """cat(|conv_a(x)|, conv_b(x)) read by a depthwise conv: only |·| stands between a branch and its
    producer, and a grouped conv cannot take the site's scale."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(torch.cat([torch.abs(self.a(x)), self.b(x)], 1)))


class AbsThenCat(nn.Module):
    """cat(...) -> |·| -> conv: the consumer walk from the cat must pass |·|."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.abs(torch.cat([self.a(x), self.b(x)], 1)))


@pytest.fixture
def without_abs():
    """The table without |·|; restored afterwards."""
    saved = ({k: v for k, v in table.items() if v == "abs"} for table in
             (dataflow.FX_FUNCTIONS, dataflow.FX_METHODS, dataflow.FX_MODULES))
    saved = list(saved)
    facts = dataflow.unregister_op("abs")
    yield facts
    dataflow.register_op("abs", facts, functions=saved[0], methods=saved[1], modules=saved[2])


def _observe(model: nn.Module, x: torch.Tensor) -> tuple[int, str, str]:
    sites = len(fxfusion.find_fusions(AbsThenCat().eval(), x))
    q = fxfusion.quantize(AbsThenCat(), x, first_last_bits=None)
    sign = next(r["input"] for r in q.fxfusion_reports["quantize"].layers if r["layer"] == "head")
    rewritten = fxfusion.rewrite(model, x, init="paper", fold="any")
    deployed = fxfusion.deploy(rewritten, [torch.randn(4, 3, 8, 8)], progress=False, stats="fit")
    return sites, sign, deployed.fxfusion_reports["deploy"].sites[0]["target"]


def test_an_op_added_to_the_table_is_used_by_find_quantize_and_deploy(without_abs) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = CatAbs().eval()
    sites, sign, target = _observe(model, x)
    assert (sites, sign) == (0, "signed")  # |·| unknown: the walk stops, the sign is unknown
    assert target == "explicit per-channel op"

    dataflow.register_op("abs", without_abs, functions=[torch.abs], methods=["abs"])
    sites, sign, target = _observe(model, x)
    assert (sites, sign) == (1, "unsigned")  # find walks through |·|; |·| >= 0
    assert target.startswith("producers")  # deploy scales conv a's rows through |·| (s > 0)


def test_autograd_names_resolve_to_table_entries() -> None:
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    pooled = nn.functional.max_pool2d(x, 2)
    assert grad_fn_name(pooled.grad_fn) == "max_pool2d_with_indices"
    assert grad_fn_name(nn.functional.relu6(x).grad_fn) == "hardtanh"
    assert grad_fn_name(x.reshape(1, -1).grad_fn) == "view"
    assert grad_fn_facts(x.mean((2, 3)).grad_fn).scale == "any"  # global pooling: per channel
    assert grad_fn_facts(x.mean(1).grad_fn).scale is None  # a mean over channels mixes them
    assert grad_fn_facts(x.mean().grad_fn).scale is None


def test_signs_follow_the_table() -> None:
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    relu = torch.relu(x)
    assert nonneg(nn.functional.max_pool2d(relu, 2).grad_fn)
    assert nonneg(nn.functional.relu6(x).grad_fn) and not nonneg(nn.functional.hardtanh(x).grad_fn)
    assert not nonneg((relu + 1.0).grad_fn)  # a python scalar operand: its sign is unknown
    assert nonneg((relu + relu).grad_fn) and not nonneg(nn.functional.silu(x).grad_fn)


def test_register_op_refuses_nothing_silently() -> None:
    assert dataflow.unregister_op("no_such_op") is None
    facts = OpFacts(keeps_axis=True)
    dataflow.register_op("my_op", facts, methods=["my_op"])
    try:
        assert dataflow.OPS["my_op"] is facts and dataflow.FX_METHODS["my_op"] == "my_op"
    finally:
        dataflow.unregister_op("my_op")
    assert "my_op" not in dataflow.FX_METHODS
