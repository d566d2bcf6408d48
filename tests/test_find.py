"""find_fusions: the sites of every zoo model, the exclusions, filters and errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxfusion
from fxfusion.zoo import ZOO


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_site_counts(zoo_model, name):
    model, x = zoo_model(name)
    report = fxfusion.find_fusions(model, x)
    assert len(report) == ZOO[name].expected_sites, str(report)
    for site in report:
        assert site.num_branches >= 2 and len(site.shapes) == site.num_branches
        assert site.channels > 0 and site.consumers


def test_find_does_not_change_the_model(zoo_model):
    model, x = zoo_model("yolov5")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxfusion.find_fusions(model, x)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_untraceable_modules_are_reported_with_reasons(zoo_model):
    model, x = zoo_model("yolov8")
    report = fxfusion.find_fusions(model, x)
    by_path = {u.path: u for u in report.untraceable}
    assert set(by_path) == {"model.22"}  # Detect assigns into its input list
    assert "item assignment" in by_path["model.22"].reason and by_path["model.22"].cls == "Detect"
    assert not [u for u in report.untraceable if u.cls == "C2f"]  # its chunk pieces iterate
    assert "Untraceable modules" in str(report)


def test_transformer_excludes_class_token_and_position_embedding(zoo_model):
    model, x = zoo_model("transformer")
    report = fxfusion.find_fusions(model, x)
    assert all(s.kind == "add" and s.axis == 2 for s in report)
    reasons = [r.reason for r in report.refused]
    assert any("parameter" in r for r in reasons if "activation" in r)  # cls-token cat and pos-embed add
    assert sum("1 activation" in r for r in reasons) >= 2


class _TokenCat(nn.Module):
    """Two activations concatenated along the sequence axis, read by a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


class _HeadCat(nn.Module):
    """A detection head: box and class branches concatenated straight into the output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.box, self.cls = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        return torch.cat([self.box(x), self.cls(x)], 1)


class _Constants(nn.Module):
    """``x + 1``, a bias add and a broadcasting add: none is a fusion."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x):
        y = self.conv(x) + 1
        y = y + self.bias
        y = y + y.mean((2, 3), keepdim=True)
        return self.out(y)


@pytest.mark.parametrize("model, x, reason", [
    (_TokenCat(), torch.randn(2, 3, 4), "cat along axis 1"),
    (_HeadCat(), torch.randn(1, 3, 8, 8), "reaches no learnable layer"),
    (_Constants(), torch.randn(1, 3, 8, 8), "activation"),
])
def test_exclusions_name_their_reason(model, x, reason):
    report = fxfusion.find_fusions(model, x)
    assert len(report) == 0
    assert any(reason in r.reason for r in report.refused), str(report)


def test_constants_refusals_cover_every_add():
    report = fxfusion.find_fusions(_Constants(), torch.randn(1, 3, 8, 8))
    reasons = " | ".join(r.reason for r in report.refused)
    assert reasons.count("1 activation") == 2 and "broadcasting add" in reasons


def test_add_chain_is_one_site():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.out = (nn.Conv2d(2, 2, 1) for _ in range(4))

        def forward(self, x):
            return self.out(self.a(x) + self.b(x) + self.c(x))

    report = fxfusion.find_fusions(Chain(), torch.randn(1, 2, 4, 4))
    assert len(report) == 1 and report[0].num_branches == 3 and report[0].absorbed == (0,)


def test_filters(zoo_model):
    model, x = zoo_model("yolov5")
    cats = fxfusion.find_fusions(model, x, ops=["cat"])
    assert len(cats) == 13 and all(s.kind == "cat" for s in cats)
    assert any("filtered out by ops=" in r.reason for r in cats.refused)
    neck = fxfusion.find_fusions(model, x, include=r"^model\.(1[0-9]|2[0-3])\b")
    assert neck and all(int(s.owner.split(".")[1]) >= 10 for s in neck)
    no_neck = fxfusion.find_fusions(model, x, exclude=r"^model\.(1[0-9]|2[0-3])\b")
    assert len(neck) + len(no_neck) == ZOO["yolov5"].expected_sites
    three = fxfusion.find_fusions(model, x, predicate=lambda s: s.num_branches > 2)
    assert [s.owner for s in three] == ["model.9"]  # the SPPF 4-way cat


def test_report_prints_and_serialises(zoo_model):
    model, x = zoo_model("unet")
    report = fxfusion.find_fusions(model, x)
    text = str(report)
    assert "Fusion sites (3)" in text and "up1.gabfusion0" in text
    data = json.loads(report.to_json())
    assert len(data["sites"]) == 3 and data["sites"][0]["kind"] == "cat"


def test_bad_inputs_have_clear_errors(zoo_model):
    model, x = zoo_model("resnet")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxfusion.find_fusions("resnet", x)
    with pytest.raises(ValueError, match="unknown op.*'mul'"):
        fxfusion.find_fusions(model, x, ops=["cat", "mul"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        fxfusion.find_fusions(model, x, include="(")


def test_training_branch_module_is_reported_not_rewritten():
    class ModeCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            if self.training:
                y = y * 2
            return self.out(y)

    report = fxfusion.find_fusions(ModeCat(), torch.randn(1, 2, 4, 4))
    assert len(report) == 0
    assert any("train and eval" in u.reason for u in report.untraceable)
