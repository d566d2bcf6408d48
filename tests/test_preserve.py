"""The function-preserving rewrite (the default), its normalization gate, NormSchedule, and its deploy.

Right after ``rewrite`` every site computes the original fusion bit for bit (the gate is 0), so
the model's outputs are equal to the original's; the tests allow 1e-5 of the output's largest
magnitude for the re-traced owners' forwards.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxfusion
from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion, gate_value, set_gate
from fxfusion.passes.runtime import leaves
from fxfusion.zoo import example_inputs

ZOO = ["yolov5", "yolov8", "resnet", "densenet", "unet", "fpn", "inception", "transformer"]
RTOL = 1e-5


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return [t for t in leaves(model(*x)) if isinstance(t, torch.Tensor)]


def _close(ref, out, rtol=RTOL):
    for a, b in zip(ref, out, strict=True):
        scale = float(a.abs().max().clamp_min(1.0))
        assert float((a - b).abs().max()) <= rtol * scale, (float((a - b).abs().max()), scale)


@pytest.mark.parametrize("name", ZOO)
def test_default_rewrite_computes_the_original_model(zoo_model, name):
    model, x = zoo_model(name)
    q = fxfusion.rewrite(model, x, fold="any")
    sites = [m for m in q.modules() if isinstance(m, GABFusion)]
    assert sites and all(m.preserve and float(m.mix) == 0.0 for m in sites)
    for seed in range(2):  # also on inputs the calibration never saw
        b = example_inputs(name, seed=10 + seed)
        _close(_out(model, b), _out(q, b))
    placed = q.fxfusion_reports["rewrite"].placed
    assert all(row["init"] == "preserve" and float(row["max |Δ| now"]) == 0.0 for row in placed)
    assert all(float(row["rel. L2 at mix=1"]) > 0 for row in placed)  # the normalization would change it


def test_paper_init_changes_the_outputs_and_is_still_available(zoo_model):
    model, x = zoo_model("resnet")
    q = fxfusion.rewrite(model, x, init="paper")
    assert all(not m.preserve and m.weight is None for m in q.modules() if isinstance(m, GABFusion))
    ref, out = _out(model, x), _out(q, x)
    assert any(float((a - b).abs().max()) > 1e-2 for a, b in zip(ref, out))
    with pytest.raises(ValueError, match="init='nice'"):
        fxfusion.rewrite(model, x, init="nice")


def test_calibration_data_is_used_and_a_rewrite_without_data_warns(zoo_model):
    model, x = zoo_model("yolov5")
    calib = [example_inputs("yolov5", seed=s) for s in range(3)]
    q = fxfusion.rewrite(model, x, calib_data=calib)
    m = next(m for m in q.modules() if isinstance(m, GABFusion))
    plain = torch.ones_like(m.weight) / m.alpha()[0].item()
    assert not torch.allclose(m.weight, plain)  # calibrated to the fusion's per-channel spread
    sites = fxfusion.find_fusions(model, x)
    with pytest.warns(UserWarning, match="got no data"):
        plain = fxfusion.rewrite(model, sites=sites)
    _close(_out(model, x), _out(plain, x))  # exact all the same


@pytest.mark.parametrize("op, norm", [("cat", "layernorm"), ("cat", "samplenorm"), ("add", "layernorm"),
                                      ("add", "none")])
def test_gate_blends_the_reference_affine_and_the_normalization(op, norm):
    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 4, 4) * 2 + 1, torch.randn(2, 3 if op == "add" else 5, 4, 4)]
    c = sum(x.shape[1] for x in xs) if op == "cat" else 3
    m = GABFusion(op, 2, 1, c, preserve=True, norm=norm, branch_channels=[x.shape[1] for x in xs] if op == "cat"
                  else None)
    fused = torch.cat(xs, 1) if op == "cat" else xs[0] + xs[1]
    h = 0.5 * fused
    flat = fused.transpose(0, 1).reshape(c, -1)
    m.calibrate(flat.mean(1), flat.std(1))
    assert torch.equal(m(*xs), fused)  # the closed gate is the original fusion, bit for bit
    if norm == "none":  # α and γ only, open from the start, equal to the fusion until trained
        assert float(m.mix) == 1.0 and torch.allclose(m(*xs), fused, atol=1e-6)
        return
    axes = 1 if norm == "layernorm" else (1, 2, 3)
    ln = (h - h.mean(axes, keepdim=True)) / torch.sqrt(h.var(axes, unbiased=False, keepdim=True) + m.eps)
    g, b = m.weight.view(1, -1, 1, 1), m.bias.view(1, -1, 1, 1)
    assert torch.allclose(g.flatten(), flat.std(1)) and torch.allclose(b.flatten(), flat.mean(1))
    set_gate(m, 1.0)
    assert torch.allclose(m(*xs), g * ln + b, atol=1e-5)
    set_gate(m, 0.25)
    assert torch.allclose(m(*xs), 0.75 * fused + 0.25 * (g * ln + b), atol=1e-5)
    y = m(*xs)
    y.pow(2).sum().backward()
    assert m.log_alpha.grad.abs().sum() > 0 and m.weight.grad.abs().sum() > 0 and m.bias.grad.abs().sum() > 0


def test_bad_preserve_arguments():
    with pytest.raises(ValueError, match="branch_channels"):
        GABFusion("cat", 2, 1, 8, preserve=True, branch_channels=[3, 4])
    with pytest.raises(ValueError, match="channels="):
        GABFusion("add", 2, 1, preserve=True)
    with pytest.raises(RuntimeError, match="preserve=True"):
        GABFusion("add", 2, 1).calibrate(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="equal initial"):
        m = GABFusion("add", 2, 1, 3, preserve=True)
        m.log_alpha.data = torch.tensor([0.0, -1.0])
        m._reset_identity()
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        set_gate(GABFusion("add", 2, 1, 3, preserve=True), 1.5)


def test_norm_schedule_ramps_holds_and_tapers(zoo_model):
    model, x = zoo_model("resnet")
    q = fxfusion.rewrite(model, x)
    sched = fxfusion.NormSchedule(q, 10, ramp=0.2, taper=0.3)
    values = [gate_value(q)] + [sched.step() for _ in range(10)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    assert all(float(m.mix) == 0.0 for m in q.modules() if isinstance(m, GABFusion))
    state = sched.state_dict()
    again = fxfusion.NormSchedule(q, 10, ramp=0.2, taper=0.3)  # a resumed run continues where it stopped
    again.load_state_dict({"steps_done": 5})
    assert gate_value(q) == 1.0 and state == {"steps_done": 10}
    no_ramp = fxfusion.NormSchedule(q, 4, ramp=0.0, peak=0.5)
    assert gate_value(q) == 0.5 and no_ramp.step() == 0.5


def test_norm_schedule_refuses_bad_arguments(zoo_model):
    model, x = zoo_model("resnet")
    with pytest.raises(ValueError, match="no function-preserving GABFusion site"):
        fxfusion.NormSchedule(model, 10)
    q = fxfusion.rewrite(model, x)
    with pytest.raises(ValueError, match="total_steps"):
        fxfusion.NormSchedule(q, 0)
    with pytest.raises(ValueError, match="ramp \\+ taper"):
        fxfusion.NormSchedule(q, 10, ramp=0.6, taper=0.6)
    with pytest.raises(ValueError, match="peak"):
        fxfusion.NormSchedule(q, 10, peak=2.0)


def _train(q, x, steps, sched=None):
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=1e-3, momentum=0.9)
    for i in range(steps):
        g = torch.Generator().manual_seed(100 + i)
        xb = tuple(torch.randn(t.shape, generator=g) for t in x)
        loss = sum(t.float().pow(2).mean() for t in leaves(q(*xb)) if isinstance(t, torch.Tensor))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("name, ops", [("yolov5", ["cat"]), ("resnet", None), ("densenet", None)])
def test_a_tapered_gate_deploys_exactly(zoo_model, name, ops):
    model, x = zoo_model(name)
    calib = [example_inputs(name, seed=s) for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxfusion.rewrite(model, x, sites=fxfusion.find_fusions(model, x, ops=ops))
        q = fxfusion.quantize(q, x, method="lsq", w_bits=4, a_bits=4)
    sched = fxfusion.NormSchedule(q, 6, ramp=0.34, taper=0.34)
    _train(q, x, 6, sched)
    assert gate_value(q) == 0.0
    deployed = fxfusion.deploy(q, calib, progress=False)
    report = deployed.fxfusion_reports["deploy"]
    assert all(s["exact"] and s["target"].startswith("nothing to fold") for s in report.sites)
    assert not [m for m in deployed.modules() if isinstance(m, (GABFusion, DeployedFusion))]
    assert not report.recalibrated  # no weight changed, so no quantizer was touched
    for b in calib:  # the deployed model computes what the trained one computed
        _close(_out(q, b), _out(deployed, b))


def test_an_open_gate_is_frozen_to_its_fit_and_measured(zoo_model):
    model, x = zoo_model("yolov5")
    calib = [example_inputs("yolov5", seed=s) for s in range(3)]
    q = fxfusion.rewrite(model, x, sites=fxfusion.find_fusions(model, x, ops=["cat"]), calib_data=calib)
    set_gate(q, 1.0)
    reference = copy.deepcopy(q)
    deployed = fxfusion.deploy(q, calib, progress=False)
    report = deployed.fxfusion_reports["deploy"]
    assert all(s["ln_max_dev"] > 1e-3 for s in report.sites)  # a per-position LN is no per-channel affine
    assert report.output_deviation["max_vs_undeployed"] > 0
    assert not [m for m in deployed.modules() if isinstance(m, (GABFusion, DeployedFusion))]
    assert float(next(m for m in reference.modules() if isinstance(m, GABFusion)).mix) == 1.0


def test_state_dict_round_trip_keeps_the_gate_and_statistics(zoo_model):
    model, x = zoo_model("yolov5")
    q = fxfusion.rewrite(model, x)
    set_gate(q, 0.7)
    state = q.state_dict()
    assert any(k.endswith(".mix") for k in state) and any(k.endswith("gabfusion0.weight") for k in state)
    other = fxfusion.rewrite(model, sites=fxfusion.find_fusions(model, x), calib_data=[x])
    other.load_state_dict(state)
    assert gate_value(other) == pytest.approx(0.7)
    _close(_out(q, x), _out(other, x))


@pytest.mark.parametrize("name, ops", [("yolov5", ["cat"]), ("resnet", None)])
def test_quantized_default_rewrite_trains_exactly_like_the_plain_quantized_model(zoo_model, name, ops):
    # a closed gate is the original op: the same quantizers see the same values, the same step follows
    model, x = zoo_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = fxfusion.quantize(model, x, method="lsq", w_bits=4, a_bits=4)
        rewritten = fxfusion.quantize(fxfusion.rewrite(model, x, sites=fxfusion.find_fusions(model, x, ops=ops)),
                                      x, method="lsq", w_bits=4, a_bits=4)
    losses = []
    for q in (plain, rewritten):
        q.train()
        opt = torch.optim.SGD(q.parameters(), lr=1e-3)
        steps = []
        for i in range(2):
            loss = sum(t.float().pow(2).mean() for t in leaves(q(*example_inputs(name, seed=20 + i))))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append(float(loss))
        losses.append(steps)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("op", ["cat", "add"])
def test_gated_site_is_the_original_op_when_closed_and_layernorm_when_open(op: str, memory_format) -> None:
    # The forward runs LayerNorm as one fused kernel on the feature axis moved last; the result is
    # what the formula says, in the layout of the fused tensor (a channels-last model stays so).
    torch.manual_seed(0)
    site = GABFusion(op, 2, dim=1, channels=8 if op == "cat" else 4, alpha="learned", preserve=True,
                     branch_channels=[4, 4] if op == "cat" else None)
    a, b = (torch.randn(2, 4, 5, 5).contiguous(memory_format=memory_format) for _ in range(2))
    plain = torch.cat([a, b], 1) if op == "cat" else a + b
    closed = site(a, b)
    assert torch.equal(closed, plain) and closed.stride() == plain.stride()
    with torch.no_grad():
        site.mix.fill_(1.0)
        site.log_alpha.copy_(torch.tensor([0.3, -0.2]))
        site.weight.uniform_(0.5, 1.5)
        site.bias.uniform_(-0.5, 0.5)
    alpha = site.alpha()
    h = torch.cat([alpha[0] * a, alpha[1] * b], 1) if op == "cat" else alpha[0] * a + alpha[1] * b
    var, mean = torch.var_mean(h, 1, unbiased=False, keepdim=True)
    want = (h - mean) * torch.rsqrt(var + site.eps) * site.weight.view(1, -1, 1, 1) + site.bias.view(1, -1, 1, 1)
    got = site(a, b)
    assert torch.allclose(got, want, atol=1e-5) and got.stride() == plain.stride()
