"""ADALoss: SimAM / Q-ADA attention, KL / JS, site resolution, teacher isolation, token layouts."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fxfusion.ada import ADALoss, js_divergence, kl_divergence, qada_attention, simam_attention, spatial_distribution
from fxfusion.gabfusion import GABFusion

# --- independent numpy reference ---------------------------------------------------------------


def _np_simam(x: np.ndarray, lam: float = 1e-4) -> np.ndarray:
    """x: (N, C, S)."""
    d2 = (x - x.mean(-1, keepdims=True)) ** 2
    var = d2.sum(-1, keepdims=True) / (x.shape[-1] - 1)
    return 1 / (1 + np.exp(-(d2 / (4 * (var + lam)) + 0.5)))


def _np_qada(x: np.ndarray, step: float | None, gamma: float = 1.0, kappa: float = 1e-6) -> np.ndarray:
    sigma = x.std(-1, ddof=1, keepdims=True)
    z = np.abs(x - x.mean(-1, keepdims=True)) / (sigma + kappa)
    s = np.log(1 + z**2)
    if step is not None:
        delta = np.abs(x - np.round(x / step) * step)
        s = s + gamma * np.log(1 + (delta / (step + kappa)) ** 2)
    return 1 / (1 + np.exp(-s))


def _np_loss(t: np.ndarray, s: np.ndarray, att, div: str) -> float:
    p = att(t) / att(t).sum(-1, keepdims=True)
    r = att(s) / att(s).sum(-1, keepdims=True)
    if div == "kl":
        d = (p * np.log(p / r)).sum(-1)
    else:
        m = (p + r) / 2
        d = 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (r * np.log(r / m)).sum(-1)
    return float(d.mean())


# --- models ------------------------------------------------------------------------------------


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shallow = nn.Conv2d(3, 4, 1)
        self.deep = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.fuse = GABFusion("cat", 2, dim=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fuse(self.shallow(x), self.deep(x)))


class Plain(nn.Module):
    """The same network before the rewrite: a bare cat, no GABFusion."""

    def __init__(self) -> None:
        super().__init__()
        self.shallow = nn.Conv2d(3, 4, 1)
        self.deep = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.shallow(x), self.deep(x)], 1))


class Tokens(nn.Module):
    """Transformer-style fusion of (N, L, D) tokens along D."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)
        self.fuse = GABFusion("cat", 2, dim=-1)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.fuse(self.a(x), self.b(x))))


class Rounder(nn.Module):
    """A minimal quantizer: round to multiples of ``scale``; counts its calls in a buffer."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.round(x / self.scale) * self.scale

    def qparams(self) -> SimpleNamespace:
        return SimpleNamespace(scale=torch.tensor(self.scale))


def _pair(seed: int = 0, noise: float = 0.1):
    torch.manual_seed(seed)
    teacher = TwoBranch()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(noise * torch.randn_like(p))
    return student, teacher


def _features(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    store = {}
    h = model.get_submodule(path).register_forward_hook(lambda m, a, o: store.setdefault("f", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return store["f"]


# --- attention and divergences -----------------------------------------------------------------


def test_simam_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # μ = 2.5, (x−μ)² = (2.25, .25, .25, 2.25), σ² = 5/3, e = (x−μ)²/(4(5/3 + 1e-4)) + ½.
    e = torch.tensor([2.25, 0.25, 0.25, 2.25]) / (4 * (5 / 3 + 1e-4)) + 0.5
    assert torch.allclose(simam_attention(x).flatten(), torch.sigmoid(e), atol=1e-7)
    assert simam_attention(x).flatten()[0].item() == pytest.approx(0.697934, abs=1e-6)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(2, 3, 5, 4)).astype(np.float64)
    ours = simam_attention(torch.from_numpy(xs)).numpy().reshape(2, 3, 20)
    np.testing.assert_allclose(ours, _np_simam(xs.reshape(2, 3, 20)), rtol=1e-12)


def test_qada_by_hand():
    x = torch.tensor([[[0.0, 1.0, 2.0, 4.2]]], dtype=torch.float64)
    # μ = 1.8, σ (n−1) = sqrt(9.68/3); step 0.5: Q(x) = (0, 1, 2, 4), Δ = (0, 0, 0, 0.2).
    sigma = (9.68 / 3) ** 0.5
    z = (x - 1.8).abs() / (sigma + 1e-6)
    r = torch.tensor([0.0, 0.0, 0.0, 0.2], dtype=torch.float64) / (0.5 + 1e-6)
    want = torch.sigmoid(torch.log1p(z**2) + 2.0 * torch.log1p(r**2))
    delta = (x - torch.round(x / 0.5) * 0.5).abs()
    got = qada_attention(x, delta, 0.5, gamma=2.0)
    assert torch.allclose(got, want, atol=1e-12)
    # No quantizer: r = 0, only the z term.
    assert torch.allclose(qada_attention(x), torch.sigmoid(torch.log1p(z**2)), atol=1e-12)
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(2, 3, 7))
    d = np.abs(xs - np.round(xs / 0.25) * 0.25)
    ours = qada_attention(torch.from_numpy(xs), torch.from_numpy(d), 0.25).numpy()
    np.testing.assert_allclose(ours, _np_qada(xs, 0.25), rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_divergence_properties(seed):
    g = torch.Generator().manual_seed(seed)
    p = spatial_distribution(torch.rand(2, 3, 16, generator=g) + 0.01)
    r = spatial_distribution(torch.rand(2, 3, 16, generator=g) + 0.01)
    assert bool((kl_divergence(p, r) >= 0).all())
    assert torch.equal(kl_divergence(p, p), torch.zeros(2, 3))
    assert torch.allclose(js_divergence(p, r), js_divergence(r, p), atol=1e-7)
    assert torch.equal(js_divergence(p, p), torch.zeros(2, 3))
    assert bool((js_divergence(p, r) <= np.log(2) + 1e-6).all())


# --- the loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["kl", "js"])
@pytest.mark.parametrize("attention", ["simam", "q-ada"])
def test_loss_zero_when_student_equals_teacher(attention, divergence):
    torch.manual_seed(0)
    teacher = TwoBranch()
    student = copy.deepcopy(teacher)
    q = {"fuse": Rounder(0.25)} if attention == "q-ada" else None
    loss_fn = ADALoss(student, teacher, attention=attention, divergence=divergence, quantizers=q)
    x = torch.randn(2, 3, 6, 6)
    student(x)
    assert loss_fn(x).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_simam_loss_matches_reference(divergence):
    student, teacher = _pair()
    loss_fn = ADALoss(student, teacher, divergence=divergence, weight=0.5)
    x = torch.randn(2, 3, 5, 5)
    student(x)
    got = loss_fn(x).item()
    t = _features(teacher, "fuse", x).double().numpy().reshape(2, 8, 25)
    s = _features(student, "fuse", x).double().numpy().reshape(2, 8, 25)
    # Direction: P from the teacher, R from the student; mean over batch and channels.
    assert got == pytest.approx(0.5 * _np_loss(t, s, _np_simam, divergence), rel=1e-4)
    assert loss_fn.last_per_site["fuse"] == pytest.approx(got / 0.5, rel=1e-6)
    if divergence == "kl":
        assert got != pytest.approx(0.5 * _np_loss(s, t, _np_simam, "kl"), rel=1e-4)


def test_qada_loss_uses_the_quantizer_without_side_effects():
    student, teacher = _pair()
    q = Rounder(0.5)
    loss_fn = ADALoss(student, teacher, attention="q-ada", gamma=1.5, quantizers={"fuse": q}, weight=1.0)
    x = torch.randn(2, 3, 4, 4)
    student(x)
    got = loss_fn(x).item()
    assert q.calls.item() == 0  # its buffers were restored after the extra calls
    t = _features(teacher, "fuse", x).double().numpy().reshape(2, 8, 16)
    s = _features(student, "fuse", x).double().numpy().reshape(2, 8, 16)
    assert got == pytest.approx(_np_loss(t, s, lambda a: _np_qada(a, 0.5, gamma=1.5), "kl"), rel=1e-4)


def test_qada_without_quantizer_warns_and_uses_sigma():
    student, teacher = _pair()
    with pytest.warns(UserWarning, match="no quantizer given for sites"):
        loss_fn = ADALoss(student, teacher, attention="q-ada", weight=1.0)
    assert loss_fn.site_quantizers == {"fuse": None}
    x = torch.randn(2, 3, 4, 4)
    student(x)
    t = _features(teacher, "fuse", x).double().numpy().reshape(2, 8, 16)
    s = _features(student, "fuse", x).double().numpy().reshape(2, 8, 16)
    assert loss_fn(x).item() == pytest.approx(_np_loss(t, s, lambda a: _np_qada(a, None), "kl"), rel=1e-4)


def test_gradient_reaches_only_the_student():
    student, teacher = _pair()
    loss_fn = ADALoss(student, teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    seen = {}
    teacher.fuse.register_forward_hook(lambda m, a, o: seen.setdefault("t", o))
    x = torch.randn(2, 3, 5, 5)
    student(x)
    loss = loss_fn(x)
    assert seen["t"].grad_fn is None and not seen["t"].requires_grad
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.shallow.weight.grad is not None and student.shallow.weight.grad.abs().sum() > 0
    assert student.deep[0].weight.grad.abs().sum() > 0
    assert student.head.weight.grad is None  # after the site: ADA does not reach it
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}


def test_student_must_run_before_each_call():
    student, teacher = _pair()
    loss_fn = ADALoss(student, teacher)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="run the student forward"):
        loss_fn(x)
    student(x)
    loss_fn(x)
    with pytest.raises(RuntimeError, match=r"sites \['fuse'\]"):
        loss_fn(x)


def test_missing_site_is_named_with_close_matches():
    torch.manual_seed(0)
    student, teacher = TwoBranch(), Plain()
    with pytest.raises(ValueError, match=r"'fuse' is not a submodule of the teacher"):
        ADALoss(student, teacher)
    with pytest.raises(ValueError, match=r"'deep\.2x'.*close matches: \['deep\.2'"):
        ADALoss(student, teacher, sites=["deep.2x"])
    with pytest.raises(ValueError, match="has none"):
        ADALoss(Plain(), Plain())
    with pytest.raises(ValueError, match="attention='sam'"):
        ADALoss(student, student, attention="sam")
    # Explicit sites present in both models work, including a {student: teacher} mapping.
    loss_fn = ADALoss(student, teacher, sites={"deep.2": "deep.2", "shallow": "shallow"})
    x = torch.randn(1, 3, 4, 4)
    student(x)
    assert loss_fn(x).item() >= 0
    assert set(loss_fn.last_per_site) == {"deep.2", "shallow"}


def test_mean_over_sites():
    student, teacher = _pair()
    both = ADALoss(student, teacher, sites=["shallow", "deep"], weight=1.0)
    x = torch.randn(2, 3, 5, 5)
    student(x)
    total = both(x).item()
    per = both.last_per_site
    assert total == pytest.approx((per["shallow"] + per["deep"]) / 2, rel=1e-6)


def test_tokens_use_d_as_channels_and_l_as_space():
    torch.manual_seed(0)
    teacher = Tokens()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.a.weight.add_(0.2 * torch.randn_like(student.a.weight))
    x = torch.randn(2, 7, 6)  # (N, L, D_in)
    for sites in (None, ["mix"]):  # a GABFusion site with dim=-1, and a plain (N, L, D) module output
        loss_fn = ADALoss(student, teacher, sites=sites, weight=1.0)
        path = "fuse" if sites is None else "mix"
        student(x)
        got = loss_fn(x).item()
        loss_fn.remove()
        t = _features(teacher, path, x).double().transpose(1, 2).numpy()  # (N, D, L)
        s = _features(student, path, x).double().transpose(1, 2).numpy()
        assert got > 0
        assert got == pytest.approx(_np_loss(t, s, _np_simam, "kl"), rel=1e-4)


def test_ddp_wrapped_student_paths_resolve_inside_the_wrapper():
    student, teacher = _pair()
    wrapped = nn.DataParallel(student)  # CPU-only: a pass-through wrapper with the same .module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_fn = ADALoss(wrapped, teacher)
    assert loss_fn.sites == {"fuse": "fuse"}


class ChannelRounder(nn.Module):
    """Per-channel quantizer for channels-last tokens: one step per D."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / self.scale) * self.scale

    def qparams(self) -> SimpleNamespace:
        return SimpleNamespace(scale=self.scale)


def test_qada_per_channel_quantizer_on_tokens():
    torch.manual_seed(0)
    teacher = Tokens()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.b.weight.add_(0.2 * torch.randn_like(student.b.weight))
    steps = torch.linspace(0.05, 0.4, 8, dtype=torch.float64)
    loss_fn = ADALoss(student.double(), teacher.double(), attention="q-ada", weight=1.0,
                      quantizers={"fuse": ChannelRounder(steps)})
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    student(x)
    got = loss_fn(x).item()

    def ref(a: np.ndarray) -> np.ndarray:  # a: (N, D, L); the step varies along D
        s_c = steps.numpy()[None, :, None]
        sigma = a.std(-1, ddof=1, keepdims=True)
        z = np.abs(a - a.mean(-1, keepdims=True)) / (sigma + 1e-6)
        r = np.abs(a - np.round(a / s_c) * s_c) / (s_c + 1e-6)
        return 1 / (1 + np.exp(-(np.log1p(z**2) + np.log1p(r**2))))

    t = _features(teacher, "fuse", x).transpose(1, 2).numpy()
    s = _features(student, "fuse", x).transpose(1, 2).numpy()
    assert got == pytest.approx(_np_loss(t, s, ref, "kl"), rel=1e-9)


class QConv(nn.Conv2d):
    """A quantized conv in the style of the quantize pass: ``conv(act_quant(x))``."""

    def __init__(self, cin: int, cout: int, scale: float) -> None:
        super().__init__(cin, cout, 1)
        self.act_quant = Rounder(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act_quant(x))


class QNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fuse = GABFusion("cat", 2, dim=1)
        self.head = QConv(8, 4, 0.25)  # consumes fuse's output
        self.fuse2 = GABFusion("add", 2, dim=1)
        self.out = nn.Conv2d(4, 1, 1)  # float consumer: no quantizer to find

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.fuse(self.a(x), self.b(x)))
        return self.out(self.fuse2(h, h))


def test_qada_auto_finds_the_consuming_quantizer():
    torch.manual_seed(0)
    teacher = QNet()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.a.weight.add_(0.3 * torch.randn_like(student.a.weight))
    loss_fn = ADALoss(student, teacher, attention="q-ada", quantizers="auto", weight=1.0)
    x = torch.randn(2, 3, 4, 4)
    student(x)
    with pytest.warns(UserWarning, match=r"no quantizer consumes the site output directly for sites \['fuse2'\]"):
        got = loss_fn(x)
    assert loss_fn.site_quantizers == {"fuse": student.head.act_quant, "fuse2": None}
    assert loss_fn.last_per_site["fuse"] == pytest.approx(
        _np_loss(_features(teacher, "fuse", x).double().numpy().reshape(2, 8, 16),
                 _features(student, "fuse", x).double().numpy().reshape(2, 8, 16),
                 lambda a: _np_qada(a, 0.25), "kl"), rel=1e-4)
    assert got.item() > 0
    with pytest.raises(ValueError, match="quantizers='first'"):
        ADALoss(student, teacher, attention="q-ada", quantizers="first")
