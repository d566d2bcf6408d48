"""profile_gradients: per-branch gradient norms at GABFusion sites and at plain YOLO-style Concat."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fxfusion.gabfusion import GABFusion
from fxfusion.profile import GradientProfile, profile_gradients


class Concat(nn.Module):
    """YOLO's Concat: takes a list of tensors."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Neck(nn.Module):
    """Two fusion sites; the shallow feature also feeds the second site (a second consumer)."""

    def __init__(self, fusion: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.deep = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.f1 = GABFusion("cat", 2, dim=1, alpha="balanced") if fusion == "gab" else Concat()
        self.mid = nn.Conv2d(8, 4, 1)
        self.f2 = GABFusion("add", 2, dim=1) if fusion == "gab" else Concat()
        self.head = nn.Conv2d(4 if fusion == "gab" else 8, 1, 1)
        self.fusion = fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.bn(self.stem(x))
        d = self.deep(s)
        y = self.mid(self.f1(s, d) if self.fusion == "gab" else self.f1([s, d]))
        return self.head(self.f2(s, y) if self.fusion == "gab" else self.f2([s, y]))


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 6, 6, generator=g) for _ in range(n)]


def _reference(model: nn.Module, site: str, batch: torch.Tensor) -> list[float]:
    """||∂L/∂x_i|| for the gradient flowing through ``site`` only, by autograd.grad on aliases."""
    inputs = {}

    def pre(m, args):
        xs = list(args[0]) if len(args) == 1 and isinstance(args[0], list) else list(args)
        aliased = [x.view_as(x) for x in xs]
        inputs["xs"] = aliased
        return (aliased,) if len(args) == 1 and isinstance(args[0], list) else tuple(aliased)

    h = model.get_submodule(site).register_forward_pre_hook(pre)
    loss = _loss(model, batch)
    h.remove()
    grads = torch.autograd.grad(loss, inputs["xs"])
    return [g.norm().item() for g in grads]


@pytest.mark.parametrize("fusion", ["gab", "concat"])
def test_rows_match_autograd(fusion):
    torch.manual_seed(0)
    model = Neck(fusion)
    batches = _batches()
    sites = None if fusion == "gab" else ["f1", "f2"]
    prof = profile_gradients(model, _loss, batches, sites=sites)
    assert [(r["site"], r["branch"]) for r in prof.rows] == [("f1", 0), ("f1", 1), ("f2", 0), ("f2", 1)]
    model.train()
    for site in ("f1", "f2"):
        per_batch = torch.tensor([_reference(model, site, b) for b in batches])  # (batches, branches)
        for i in range(2):
            row = next(r for r in prof.rows if r["site"] == site and r["branch"] == i)
            assert row["mean"] == pytest.approx(per_batch[:, i].mean().item(), rel=1e-5)
            assert row["std"] == pytest.approx(per_batch[:, i].std().item(), rel=1e-4)
            assert row["batches"] == 3
        means = per_batch.mean(0)
        assert prof.ratios[site] == pytest.approx((means.max() / means.min()).item(), rel=1e-5)


def test_model_state_is_restored():
    torch.manual_seed(0)
    model = Neck("gab")
    model.eval()
    model.bn.train()  # a per-module flag that a blanket .eval() would lose
    sentinel = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = sentinel.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    energy = model.f1.grad_energy.clone()
    profile_gradients(model, _loss, _batches())
    assert not model.training and model.bn.training and not model.deep.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats, λ, Ḡ
    assert torch.equal(model.f1.grad_energy, energy)
    assert torch.equal(model.head.weight.grad, sentinel)
    assert model.stem.weight.grad is None


def test_str_json_and_png(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "imbalance.png"
    prof = profile_gradients(Neck("concat"), _loss, _batches(2), sites=["f1", "f2"], plot=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = str(prof)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["site", "branch"]
    assert len(lines) == 2 + 4 and len({len(line) for line in lines}) == 1  # aligned columns
    data = json.loads(prof.to_json())
    assert [r["site"] for r in data["rows"]] == ["f1", "f1", "f2", "f2"]
    assert data["rows"][0]["shape"] == [2, 4, 6, 6]
    prof.plot(tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "imbalance.png"]  # no temp files


def test_branch_without_gradient_is_reported_not_hidden():
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.cat = Concat()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.cat([x, self.conv(x)]).sum()  # the raw input does not require grad

    prof = profile_gradients(Frozen(), lambda m, b: m(b), _batches(2), sites=["cat"])
    raw, conv = prof.rows
    assert raw["batches"] == 0 and math.isnan(raw["mean"]) and math.isnan(prof.ratios["cat"])
    assert conv["batches"] == 2 and conv["mean"] > 0
    assert json.loads(prof.to_json())["rows"][0]["mean"] is None
    assert "-" in str(prof).splitlines()[2]


def test_errors():
    model = Neck("concat")
    with pytest.raises(ValueError, match="has none"):
        profile_gradients(model, _loss, _batches(1))
    with pytest.raises(ValueError, match=r"\['f3'\].*close matches"):
        profile_gradients(model, _loss, _batches(1), sites=["f3"])
    model.unused = Concat()
    with pytest.raises(ValueError, match=r"\['unused'\] were never called"):
        profile_gradients(model, _loss, _batches(1), sites=["f1", "unused"])
    with pytest.raises(ValueError, match="scalar tensor"):
        profile_gradients(model, lambda m, b: m(b), _batches(1), sites=["f1"])
    with pytest.raises(ValueError, match="empty"):
        profile_gradients(model, _loss, [], sites=["f1"])
    assert isinstance(GradientProfile().to_json(), str)
