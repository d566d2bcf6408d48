"""find_fusions and rewrite on patterns from real models: never an exception out of them, and
the graph each module really runs (issue 14, class 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfusion


class OptionalScale(nn.Module):
    """``if scale is not None``: traced with a proxy, the graph multiplies by ``scale`` even when the
    model passes None (a timm pattern that made find raise "Tensor * NoneType")."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is not None:
            x = x * scale
        return torch.cat([self.a(x), self.b(x)], 1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = OptionalScale()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(torch.relu(self.stem(x))))


def test_a_none_argument_is_specialized_not_traced_as_a_tensor() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = Net().eval()
    report = fxfusion.find_fusions(model, x)
    assert [s.name for s in report.sites] == ["block.gabfusion0"], str(report)
    assert report.sites[0].owner_none_args == ("scale",)
    rewritten = fxfusion.rewrite(model, x).eval()
    assert torch.equal(rewritten(x), model(x))
    with pytest.raises(AssertionError, match="specialized to have value None"):  # loud, never silent
        rewritten.block(torch.randn(2, 4, 8, 8), torch.tensor(2.0))


class UntraceableRoot(Net):
    """The root branches on data, so ``block`` is traced as a unit of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        if float(y.mean()) > 1e9:
            y = -y
        return self.head(self.block(y))


class Broken(nn.Module):
    """A module whose analysis fails inside fxfusion (its traced graph cannot be re-run)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


def test_a_failure_on_one_module_is_its_refusal(monkeypatch) -> None:
    x = torch.randn(2, 3, 8, 8)
    model = UntraceableRoot().eval()  # so that ``block`` is a unit of its own
    model.block = Broken()
    from fxfusion.passes import find

    real = find._propagate_shapes

    def failing(gm, args, kwargs):
        if type(gm).__name__ == "Broken":
            raise TypeError("unsupported operand type(s) for *: 'Tensor' and 'NoneType'")
        return real(gm, args, kwargs)

    monkeypatch.setattr(find, "_propagate_shapes", failing)
    report = fxfusion.find_fusions(model, x)  # no exception
    refusal = next(r for r in report.refused if r.where == "block")
    assert "fxfusion failed on it (TypeError: unsupported operand" in refusal.reason
    assert "block" in str(report) and not report.sites


def test_a_unit_called_with_none_is_traced_as_it_runs() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = UntraceableRoot().eval()
    report = fxfusion.find_fusions(model, x)
    assert [s.name for s in report.sites] == ["block.gabfusion0"], str(report)
    assert not [r for r in report.refused if "failed" in r.reason]


class FunctionalWeight(nn.Module):
    """Swin's attention: the Linear's weight is read by ``F.linear``, its forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.qkv = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).flatten(2).transpose(1, 2)
        return nn.functional.linear(y, self.qkv.weight, self.qkv.bias)


def test_a_layer_whose_forward_never_runs_stays_float_and_exports(tmp_path) -> None:
    x = torch.randn(2, 3, 4, 4)
    q = fxfusion.quantize(FunctionalWeight().eval(), x)
    report = q.fxfusion_reports["quantize"]
    assert [r["layer"] for r in report.layers] == ["stem"]
    assert [r["layer"] for r in report.float_layers] == ["qkv"] and "not called" in report.float_layers[0]["reason"]
    q.train()
    q(x)
    deployed = fxfusion.deploy(q, [x], progress=False)
    fxfusion.export_onnx(deployed, x, tmp_path / "m.onnx")  # every quantizer placed was initialized


class _Loss(nn.Module):
    """Assigns an attribute in forward, as Ultralytics' RT-DETR loss does (``self.device = ...``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.device = x.device
        return x.mean()


class _WithLoss(nn.Module):
    """A root that does not trace (data-dependent branch), so find traces its children one by one,
    among them a ``criterion`` that the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)
        self.criterion = _Loss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(torch.cat([self.a(x), self.b(x)], 1))
        return y if float(y.sum()) > -1e9 else -y


def test_tracing_leaves_no_proxy_in_the_model() -> None:
    import copy
    import pickle

    model = _WithLoss().eval()
    x = torch.randn(1, 3, 8, 8)
    fxfusion.find_fusions(model, x)
    assert "device" not in vars(model.criterion)  # the trace's fx Proxy would break deepcopy and pickle
    pickle.dumps(copy.deepcopy(model))
    fxfusion.deploy(fxfusion.quantize(model, x), x, progress=False)
