"""Property-based fuzzing of the whole flow on random multi-branch networks (``generator.py``).

Two seeded (``derandomize=True``) hypothesis runs of 200 networks each (different networks: the seed
comes from the test name); about 1 minute together on one idle thread, 2 minutes under load:

- ``test_sites_and_identity_rewrite`` (~5 s): find_fusions reports exactly the planted sites and
  traces the whole model; ``rewrite(alpha="fixed", alpha_init=1.0, norm="none")`` places every site
  and leaves the eval outputs bit for bit unchanged.
- ``test_full_pipeline`` (~60 s): the same two properties, then the float variant (rewrite with
  random α -> deploy, LayerNorm freeze "auto"/"fit"/"ln" in turn): one report row per site, and where
  every fold is reported exact the deployed model equals the frozen-LayerNorm model to 1e-5 of the
  output range (no GABFusion left when nothing stayed explicit); and the QAT flow: rewrite ->
  quantize (lsq/pact/dsq/n2uq/minmax, weight and activation bits 2..8) -> 2 SGD steps -> deploy
  (2 calibration batches) -> export_onnx -> verify_onnx ``passed`` (at most 0.1% mismatching
  elements at both onnxruntime optimization levels) and ``exact`` (every ONNX quantizer agrees with
  its PyTorch module on its own input).

The long campaign (thousands of networks, same pipeline, seeded ``random.Random``) is
``benchmarks/fuzz.py``; its last results are in ``benchmarks/results/fuzz.md``.

Failures the fuzzing found are pinned below as small hand-written regressions, each a strict xfail
that says what is wrong: when a pass is fixed, its xfail passes and strict mode fails the suite, so
the fix is noticed (then it becomes a plain regression test, as three of them already did). The
generator still plants those patterns; meanwhile ``generator.KNOWN_ISSUES`` (failure kinds the fuzz
tests count instead of failing on) and the ``FIND_WALKS_THROUGH_*`` flags (what the planted-site
count assumes find does) say how they are counted: update both with the fix. Two findings are not
tolerated by the fuzz tests, because the seeded runs here do not meet them (the campaign does, about
once per 500 networks): the W5-8/A4 export crash and tie flips in verify_onnx.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from torch import nn

import fxfusion
from fxfusion.passes.verify import MAX_MISMATCH_FRACTION

from .generator import (
    KNOWN_ISSUES,
    RandomChoices,
    build,
    inputs,
    networks,
    pipeline_options,
    plan_network,
    run_example,
)

_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _assert_only_known(outcome) -> None:
    for f in outcome.failures:
        event(f"known issue: {f.kind}" if f.kind in KNOWN_ISSUES else f"FAILED: {f.kind}")
    if outcome.unknown:
        raise outcome.unknown[0]


# --------------------------------------------------------------------------- the fuzz runs


@settings(max_examples=200, **_SETTINGS)
@given(spec=networks())
def test_sites_and_identity_rewrite(spec):
    event(f"sites: {min(spec.sites, 6)}{'+' if spec.sites >= 6 else ''}")
    _assert_only_known(run_example(spec, stages=("sites", "identity")))


@settings(max_examples=200, **_SETTINGS)
@given(spec=networks(), options=pipeline_options())
def test_full_pipeline(spec, options, tmp_path_factory):
    method, w_bits, a_bits = options
    event(f"method: {method}")
    outcome = run_example(spec, method=method, w_bits=w_bits, a_bits=a_bits,
                          tmpdir=tmp_path_factory.mktemp("onnx"))
    _assert_only_known(outcome)


def test_generator_is_reproducible_and_covers_the_patterns():
    """The seeded source (the benchmark's) builds the same plan twice, and 300 plans cover every
    pattern the generator knows; every model runs."""
    assert repr(plan_network(RandomChoices(7))) == repr(plan_network(RandomChoices(7)))
    tags = set()
    for seed in range(300):
        spec = plan_network(RandomChoices(seed))
        tags |= spec.tags
    expected = {"cat2", "cat3", "cat4", "add2", "add3", "add4", "nested_fusion", "skip", "skip_upsampled",
                "depthwise", "stride2", "reflect_padding", "valid_padding", "bn", "maxpool", "avgpool", "up",
                "functional_act", "token", "tblock", "token_cat", "token_add", "unembed", "ln", "linear",
                "decoy:const_add", "decoy:alpha_add", "decoy:bcast_add", "decoy:spatial_cat", "decoy:seq_cat",
                "aux_output_fusion", "multi_output", "head:conv", "head:gap_linear", "head:mean_linear",
                "head:token_linear", "head:token_mean_linear",
                *(f"act:{a}" for a in ("relu", "leaky_relu", "silu", "gelu", "hardswish")),
                *(f"add_style:{s}" for s in ("chain", "torch", "method", "iadd", "right", "tree")),
                *(f"cat_fn:{f}" for f in ("cat", "concat", "concatenate"))}
    assert expected <= tags, sorted(expected - tags)
    spec = plan_network(RandomChoices(3))
    build(spec)(inputs(spec, 1)[0])


# --------------------------------------------------------------------------- regressions found by fuzzing


def _sites(model: nn.Module, x: torch.Tensor) -> int:
    return len(fxfusion.find_fusions(model.eval(), x))


class _MeanHead(nn.Module):
    """Two conv branches added, then a global-average-pooled Linear head (``gap=False``: ``mean``)."""

    def __init__(self, gap: bool) -> None:
        super().__init__()
        self.gap = gap
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1) if self.gap else y.mean((2, 3))
        return self.fc(pooled)


@pytest.mark.parametrize("gap", [True, False])
def test_fusion_read_by_a_global_pooled_linear_head_is_a_site(gap):
    # found by fuzzing (fixed): find did not walk through x.mean((2, 3)), as in test_export's ConvNet
    torch.manual_seed(0)
    assert _sites(_MeanHead(gap), torch.randn(2, 3, 4, 4)) == 1


class _TokenMeanHead(nn.Module):
    """Two token Linears added, then a mean over the tokens and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, t):
        return self.fc((self.a(t) + self.b(t)).mean(1))


def test_token_fusion_read_by_a_mean_pooled_linear_head_is_a_site():
    # found by fuzzing (fixed): find follows the feature axis through a mean over token positions
    torch.manual_seed(0)
    assert _sites(_TokenMeanHead(), torch.randn(2, 16, 4)) == 1


class _TokensBackToImage(nn.Module):
    """A pre-norm residual token block, then tokens -> image and a conv (a hybrid ViT/CNN stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        t = t + self.fc(self.ln(t))
        return self.conv(t.transpose(1, 2).unflatten(2, (4, 4)))


def test_token_residual_add_read_by_a_conv_after_unflatten_is_a_site():
    # found by fuzzing (fixed): find follows the feature axis through transpose/unflatten by value
    torch.manual_seed(0)
    assert _sites(_TokensBackToImage(), torch.randn(2, 4, 4, 4)) == 1


class _AddIntoCat(nn.Module):
    def __init__(self, cat_fn) -> None:
        super().__init__()
        self.cat_fn = cat_fn
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return self.head(self.cat_fn([y, self.c(x)], 1))


@pytest.mark.parametrize("cat_fn", [torch.cat, torch.concat, torch.concatenate])
def test_add_feeding_a_cat_is_a_site(cat_fn):
    # found by fuzzing (fixed): torch.concatenate was missing from find's axis-preserving ops
    torch.manual_seed(0)
    assert _sites(_AddIntoCat(cat_fn), torch.randn(2, 3, 8, 8)) == 2  # the add and the cat


class _RightNestedAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.a(x) + (self.b(x) + self.c(x)))


def test_identity_rewrite_of_right_nested_add_is_bit_exact():
    # found by fuzzing (fixed): GABFusion summed the merged branches left to right, (a + b) + c
    torch.manual_seed(0)
    model, x = _RightNestedAdd().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = fxfusion.rewrite(model, x, alpha="fixed", alpha_init=1.0, norm="none").eval()
    assert len(same.fxfusion_reports["rewrite"].placed) == 1
    with torch.no_grad():
        assert torch.equal(model(x), same(x))


class _NearConstant(nn.Module):
    """A float model whose output varies by ~3e-4 around 10: its range is far below its magnitude."""

    def forward(self, x):
        return (x * 1e-3 + 10.0).mean((2, 3))


def test_verify_tolerates_float_noise_on_near_constant_outputs(tmp_path):
    torch.manual_seed(0)
    model, x = _NearConstant().eval(), torch.randn(2, 3, 8, 8)
    path = tmp_path / "near_constant.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxfusion.export_onnx(model, x, path)
    # found by fuzzing (fixed): the tolerance was relative to the output's range only, so 1-ulp differences
    # (9.5e-7) between torch's and onnxruntime's reductions failed an output of magnitude 10 and range 3e-4
    report = fxfusion.verify_onnx(model, path, x)
    assert report.passed, report


class _ReflectConv(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_verify_code_check_of_a_reflect_padded_conv(tmp_path, mode):
    # Found by fuzzing: the graph quantizes the padded input (torch.onnx emits Pad, then Conv), the
    # PyTorch quantizer the unpadded one; verify reported 100% code mismatch at conv although the
    # outputs and codes agreed. It now compares them as the graph holds them.
    torch.manual_seed(0)
    model, x = _ReflectConv(mode).eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxfusion.quantize(model, x, method="lsq", w_bits=4, a_bits=4)
        q.train()
        q(x)
        q.eval()
        fxfusion.export_onnx(q, x, tmp_path / "reflect.onnx")
    report = fxfusion.verify_onnx(q, tmp_path / "reflect.onnx", x)
    assert report.passed and report.exact
    assert report.quantizers and all(c.end_to_end_mismatch == 0 for c in report.quantizers), report
    assert report.forced and not report.notes, report  # the codes were held equal, padded or not


class _ReluChain(nn.Module):
    """relu -> conv -> relu -> conv: the first conv reads and feeds unsigned activations."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(torch.relu(x))))


@pytest.mark.parametrize("method", ["lsq", "minmax"])
@pytest.mark.parametrize("w_bits, a_bits", [
    (4, 4), (8, 2), (5, 3),
    (8, 4), (5, 4),  # found by fuzzing (fixed): a no-op Max keeps onnxruntime from a uint4 QLinearConv
])
def test_export_of_a_relu_chain_at_mixed_bits(tmp_path, method, w_bits, a_bits):
    torch.manual_seed(0)
    model, x = _ReluChain().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxfusion.quantize(model, x, method=method, w_bits=w_bits, a_bits=a_bits, first_last_bits=None)
        q.train()
        q(x)
        q.eval()
        fxfusion.export_onnx(q, x, tmp_path / "chain.onnx")
    assert fxfusion.verify_onnx(q, tmp_path / "chain.onnx", x).passed


class _NearConstantBranch(nn.Module):
    """A feature cat of two token Linears; branch ``a`` barely varies over the positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 3)
        with torch.no_grad():
            self.a.weight.mul_(2e-5)
            self.a.bias.fill_(1.0)

    def forward(self, t):
        return self.head(torch.cat([self.a(t), self.b(t)], -1))


@pytest.mark.xfail(strict=True, reason=(
    "deploy(stats='fit') fits A_c = cov(h_c, y_c) / var(h_c) per channel; for a channel whose variance over "
    "the calibration positions is tiny but above the 1e-12 guard this gives A = 1.9e3, B = -9.3e2, which "
    "cancel: the fold into the producers is exact in algebra but loses float32 digits, and the report "
    "calls it exact while max_vs_frozen_ln is 4.1e-5 > 1e-5 x output range (2.07)"))
def test_fit_freeze_of_a_near_constant_channel_folds_exactly():
    torch.manual_seed(0)
    model, batches = _NearConstantBranch().eval(), [torch.randn(2, 16, 4) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = fxfusion.rewrite(model, batches[0], init="paper")  # the fit of a real LayerNorm
        deployed = fxfusion.deploy(rewritten, batches, stats="fit", progress=False)
    report = deployed.fxfusion_reports["deploy"]
    assert [s["exact"] for s in report.sites] == [True]
    with torch.no_grad():
        out_range = max(float(o.max() - o.min()) for o in map(deployed, batches))
    assert report.output_deviation["max_vs_frozen_ln"] <= 1e-5 * max(1.0, out_range)


class _TwoFeatureLayerNorms(nn.Module):
    """Tokens -> two LayerNorms over 2 features (outputs +-1/sqrt(1 + eps) = +-0.9999951) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2, self.fc = nn.LayerNorm(2), nn.LayerNorm(2), nn.Linear(2, 3)

    def forward(self, t):
        return self.fc(self.norm2(self.norm1(t)))


@pytest.mark.parametrize("method", ["pact", "minmax"])
def test_verify_passes_an_export_whose_quantizers_are_exact(tmp_path, method):
    torch.manual_seed(0)
    model, t = _TwoFeatureLayerNorms().eval(), torch.randn(2, 16, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxfusion.quantize(model, t, method=method, w_bits=8, a_bits=8)
        q.train()
        q(t)
        q.eval()
        fxfusion.export_onnx(q, t, tmp_path / "ties.onnx")
    # found by fuzzing (fixed): the fc input is +-0.9999951 everywhere, and a data-initialized 8-bit clip
    # [-0.9999951, 0.9999951] puts every element on a rounding tie (x / s = 127.5); onnxruntime's LayerNorm
    # differs by an ulp and 31-50% of the outputs mismatch. With the codes held equal every float segment
    # agrees, so verify passes it as rounding-tie flips only.
    report = fxfusion.verify_onnx(q, tmp_path / "ties.onnx", t)
    assert report.exact and report.tie_flips_only
    assert report.max_mismatch_fraction > MAX_MISMATCH_FRACTION  # the case is still a hard one
    assert report.passed and "rounding-tie flips only" in str(report), report
