"""deploy: freeze the LayerNorm, fold α and the affine, keep the original topology, measure."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxfusion
from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion
from fxfusion.passes.calibrate import calibration_batches
from fxfusion.passes.freeze import freeze
from fxfusion.passes.runtime import leaves
from fxfusion.zoo import example_inputs


def _rewritten(zoo_model, name, ops=None, seed=0):
    model, x = zoo_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxfusion.rewrite(model, sites=fxfusion.find_fusions(model, x, ops=ops), init="paper")
    torch.manual_seed(seed)
    for m in q.modules():  # trained-looking, unequal α so that the folds are not trivial
        if isinstance(m, GABFusion):
            m.log_alpha.data.uniform_(-1.0, 0.5)
    return model, q, [example_inputs(name, seed=s) for s in range(3)]


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return [t for t in leaves(model(*x)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name, ops", [("yolov5", ["cat"]), ("yolov8", ["cat"]), ("densenet", None),
                                       ("inception", None), ("resnet", None), ("fpn", None)])
def test_exact_folds_reproduce_the_frozen_model(zoo_model, name, ops):
    original, q, batches = _rewritten(zoo_model, name, ops)
    deployed = fxfusion.deploy(q, batches, progress=False)
    frozen = copy.deepcopy(q)
    freeze(frozen, calibration_batches(batches))
    # an independent freeze (BN not folded first) agrees to float noise; the report's own
    # frozen-vs-deployed comparison (same statistics) is held to 1e-5 below
    for b in batches:
        for ref, out in zip(_out(frozen, b), _out(deployed, b)):
            scale = ref.abs().max().clamp_min(1.0)
            assert (ref - out).abs().max() <= 1e-4 * scale
    report = deployed.fxfusion_reports["deploy"]
    assert all(s["exact"] for s in report.sites)
    assert report.output_deviation["max_vs_frozen_ln"] <= 1e-5 * max(
        1.0, max(float(t.abs().max()) for b in batches for t in _out(frozen, b)))
    # original topology: no GABFusion left, owners have their own class and forward back
    assert not [m for m in deployed.modules() if isinstance(m, (GABFusion, DeployedFusion))]
    deployed_modules = dict(deployed.named_modules())
    for path, m in original.named_modules():  # same paths and classes; BN after a conv became Identity
        new = deployed_modules[path]
        assert type(new) is type(m) or (isinstance(m, torch.nn.BatchNorm2d) and isinstance(new, torch.nn.Identity))
    for m in deployed.modules():
        assert not hasattr(type(m), "_fxfusion_base")


def test_report_lists_targets_and_deviation(zoo_model):
    _, q, batches = _rewritten(zoo_model, "yolov5", ["cat"])
    report = fxfusion.deploy(q, batches, progress=False).fxfusion_reports["deploy"]
    assert len(report.sites) == 13
    assert all(s["target"].startswith(("producers", "consumers")) for s in report.sites)
    assert all(s["ln_mean_dev"] >= 0 and s["ln_max_dev"] >= s["ln_mean_dev"] for s in report.sites)
    assert "Deployed 13 GABFusion site(s)" in str(report)
    assert set(report.to_dict()) >= {"sites", "output_deviation", "recalibrated"}


def test_unfoldable_sites_stay_explicit_and_say_why(zoo_model):
    # per-channel ("fit") affines cannot pass the transformer's LayerNorms: explicit ops, reported
    _, q, batches = _rewritten(zoo_model, "transformer")
    frozen = copy.deepcopy(q)
    freeze(frozen, calibration_batches(batches))
    deployed = fxfusion.deploy(q, batches, progress=False, stats="fit")
    report = deployed.fxfusion_reports["deploy"]
    explicit = [s for s in report.sites if s["target"] == "explicit per-channel op"]
    assert explicit and all("LayerNorm" in s["note"] for s in explicit)
    assert not [m for m in deployed.modules() if isinstance(m, GABFusion)]
    left = [m for m in deployed.modules() if isinstance(m, DeployedFusion)]
    assert len(left) == len(explicit) and all(not m.is_bare for m in left)
    for ref, out in zip(_out(frozen, batches[0]), _out(deployed, batches[0])):
        assert torch.allclose(ref, out, atol=1e-5)


def test_channel_uniform_affine_folds_through_layernorm(zoo_model):
    # the paper's statistics give a channel-uniform affine, which a LayerNorm absorbs exactly
    _, q, batches = _rewritten(zoo_model, "transformer")
    frozen = copy.deepcopy(q)
    freeze(frozen, calibration_batches(batches), stats="ln")
    deployed = fxfusion.deploy(q, batches, progress=False, stats="ln")
    assert not [m for m in deployed.modules() if isinstance(m, (GABFusion, DeployedFusion))]
    for ref, out in zip(_out(frozen, batches[0]), _out(deployed, batches[0])):
        assert torch.allclose(ref, out, atol=1e-5)


def test_padded_consumer_shift_is_reported_approximate(zoo_model):
    _, q, batches = _rewritten(zoo_model, "unet")
    report = fxfusion.deploy(q, batches, progress=False).fxfusion_reports["deploy"]
    assert all(s["target"].startswith("consumers") and not s["exact"] for s in report.sites)
    assert all("zero-padded borders" in s["note"] for s in report.sites)


def test_quantized_model_deploys_recalibrates_and_stays_trainable(zoo_model):
    _, q, batches = _rewritten(zoo_model, "yolov5", ["cat"])
    x = batches[0]
    qat = fxfusion.quantize(q, x, method="lsq", w_bits=4, a_bits=4)
    qat.train()
    qat(*x)  # initialise the quantizers
    deployed = fxfusion.deploy(qat, batches, progress=False)
    report = deployed.fxfusion_reports["deploy"]
    assert report.recalibrated and all(r.endswith(("act_quant", "weight_quant")) for r in report.recalibrated)
    deployed.train()
    opt = torch.optim.Adam(deployed.parameters(), lr=2e-5)
    loss = sum(t.float().pow(2).mean() for t in leaves(deployed(*x)) if isinstance(t, torch.Tensor))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_bad_deploy_arguments(zoo_model):  # empty or non-finite calibration data: tests/test_bad_inputs.py
    _, q, batches = _rewritten(zoo_model, "densenet")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxfusion.deploy("model", batches)
    with pytest.raises(ValueError, match="stats='median'"):
        fxfusion.deploy(q, batches, stats="median")
