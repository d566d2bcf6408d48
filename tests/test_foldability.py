"""rewrite decides at placement how deploy will fold each site (issue 14, class 5): by default it
places only sites that fold exactly, so the deployed model has the original topology and an ONNX
graph no larger than the same model quantized without rewrite."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch

import fxfusion
from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion, set_gate
from fxfusion.passes.foldability import predict_folds, verdict
from fxfusion.zoo import build, example_inputs


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_default_places_only_exactly_foldable_sites_and_says_why_not_the_others() -> None:
    model, (x,) = build("yolov5").eval(), example_inputs("yolov5")
    report = _quiet(fxfusion.rewrite, model, x).fxfusion_reports["rewrite"]
    assert len(report.placed) == 13 and all(r["deploy"].startswith("exact: ") for r in report.placed)
    skipped = [r for r in report.refused if r.reason.startswith("not placed")]
    # the C3 bottleneck adds: a SiLU ends each branch, and nothing after them takes a per-channel scale
    assert len(skipped) == 7 and all("silu is not positively homogeneous" in r.reason for r in skipped)
    assert all("fold='any'" in r.reason for r in skipped)


@pytest.mark.parametrize(("fold", "placed"), [("exact", 0), ("approximate", 3), ("any", 3)])
def test_fold_option_on_border_approximate_sites(fold: str, placed: int) -> None:
    model, (x,) = build("unet").eval(), example_inputs("unet")
    q = _quiet(fxfusion.rewrite, model, x, fold=fold)
    rows = q.fxfusion_reports["rewrite"].placed
    assert len(rows) == placed and all(r["deploy"].startswith("approximate: consumers") for r in rows)


def test_unknown_fold_option_is_refused() -> None:
    model, (x,) = build("resnet").eval(), example_inputs("resnet")
    with pytest.raises(ValueError, match="fold='sometimes' is not one of"):
        fxfusion.rewrite(model, x, fold="sometimes")


@pytest.mark.parametrize("name", ["resnet", "yolov5", "unet", "transformer", "fpn"])
def test_prediction_is_what_deploy_does_with_the_gate_open(name: str) -> None:
    torch.manual_seed(0)
    model, (x,) = build(name).eval(), example_inputs(name)
    q = _quiet(fxfusion.rewrite, model, x, fold="any")
    predicted = {p: verdict(d) for p, d in predict_folds(q, (x,)).items()}
    set_gate(q, 1.0)  # as if QAT ended with the normalization on: deploy has to fold
    for m in q.modules():  # trained-looking α: different per branch
        if isinstance(m, GABFusion):
            with torch.no_grad():
                m.log_alpha.copy_(torch.linspace(-0.5, 0.3, m.num_branches))
    rows = _quiet(fxfusion.deploy, q, [x], progress=False).fxfusion_reports["deploy"].sites
    actual = {r["site"]: "explicit" if r["target"].startswith(("explicit", "producers; shift kept"))
              else "exact" if r["exact"] else "approximate" for r in rows}
    assert actual == predicted


def _qat_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = model(x)
    loss = sum(t.float().pow(2).mean() for t in fxfusion.passes.runtime.tensors(out))
    loss.backward()
    opt.step()
    model.eval()


def test_default_rewrite_deploys_to_the_original_topology(tmp_path) -> None:
    torch.manual_seed(0)
    model, (x,) = build("yolov5").eval(), example_inputs("yolov5")
    plain = _quiet(fxfusion.quantize, model, x, method="lsq", w_bits=4, a_bits=4)
    q = _quiet(fxfusion.quantize, _quiet(fxfusion.rewrite, model, x), x, method="lsq", w_bits=4, a_bits=4)
    set_gate(q, 1.0)  # the gate left open: deploy must fold every site
    _qat_step(plain, x)
    _qat_step(q, x)
    deployed = _quiet(fxfusion.deploy, q, [x], progress=False)
    assert all(r["exact"] for r in deployed.fxfusion_reports["deploy"].sites)
    assert not [m for m in deployed.modules() if isinstance(m, (GABFusion, DeployedFusion))]
    baseline = _quiet(fxfusion.deploy, plain, [x], progress=False)
    nodes = {}
    for label, m in (("rewritten", deployed), ("baseline", baseline)):
        path = tmp_path / f"{label}.onnx"
        fxfusion.export_onnx(m, x, path)
        nodes[label] = len(onnx.load(str(path)).graph.node)
    assert nodes["rewritten"] <= nodes["baseline"], nodes


class _OneFoldsOneDoesNot(torch.nn.Module):
    """One owner, two sites: a cat of convs (folds into its producers) and an add of SiLU branches
    (different per-branch scales cannot pass a SiLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Conv2d(4, 4, 1) for _ in range(4))
        self.head_cat, self.head_add = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        z = torch.nn.functional.silu(self.c(x)) + torch.nn.functional.silu(self.d(x))
        return self.head_cat(y) + self.head_add(z)


@pytest.mark.parametrize("inplace", [False, True])
def test_an_owner_with_a_refused_site_keeps_its_foldable_one(inplace: bool) -> None:
    torch.manual_seed(0)
    model, x = _OneFoldsOneDoesNot().eval(), torch.randn(2, 4, 8, 8)
    want = model(x)
    q = _quiet(fxfusion.rewrite, model, x, inplace=inplace)
    report = q.fxfusion_reports["rewrite"]
    assert [r["op"] for r in report.placed] == ["cat"] and report.placed[0]["deploy"].startswith("exact: ")
    refused = [r for r in report.refused if r.reason.startswith("not placed")]
    assert [r.kind for r in refused] == ["add"] and "silu" in refused[0].reason
    children = [n for n, m in q.named_children() if isinstance(m, GABFusion)]
    assert len(children) == 1  # the refused site's module is gone, not left unused
    assert (q is model) == inplace and torch.equal(q(x), want)
    if not inplace:  # the user's model is untouched
        assert type(model) is _OneFoldsOneDoesNot and not any(isinstance(m, GABFusion) for m in model.modules())


def test_prediction_leaves_the_model_as_it_was() -> None:
    # predict_folds folds BatchNorms and freezes sites on a copy that shares the weights: nothing of
    # the model may change, not a module, not a tensor's value
    model, (x,) = build("resnet").eval(), example_inputs("resnet")
    q = _quiet(fxfusion.rewrite, model, x, fold="any")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    types = {n: type(m) for n, m in q.named_modules()}
    report = fxfusion.find_fusions(model, x)
    assert report.conv_bn and all(isinstance(model.get_submodule(bn), torch.nn.BatchNorm2d) for _, bn in report.conv_bn)
    decisions = predict_folds(q, (x,), report.conv_bn)
    assert decisions and {n: type(m) for n, m in q.named_modules()} == types
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
