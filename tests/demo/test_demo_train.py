"""Tests of fxfusion.demo.train: hooks, determinism, loader cycling, schedule and errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fxfusion.demo.train import TrainHook, _lr_factor, train


def _setup(n_batches=3, batch_size=4):
    """A linear model on random data, a list 'loader' and an MSE loss in the (loss, items) form."""
    g = torch.Generator().manual_seed(0)
    loader = [
        (torch.randn(batch_size, 3, 2, 2, generator=g), torch.randn(batch_size, 1, generator=g))
        for _ in range(n_batches)
    ]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))

    def loss_fn(outputs, targets):
        loss = nn.functional.mse_loss(outputs, targets)
        return loss, loss.detach().view(1)

    return model, loader, loss_fn


class _Recorder(TrainHook):
    def __init__(self, extra=None):
        self.extra, self.calls = extra, []

    def extra_loss(self, model, images, outputs):
        self.calls.append(("extra_loss", tuple(images.shape), tuple(outputs.shape)))
        return None if self.extra is None else torch.tensor(self.extra)

    def after_backward(self, model):
        grads = [p.grad is not None for p in model.parameters()]
        self.calls.append(("after_backward", all(grads)))

    def after_step(self, model, step):
        self.calls.append(("after_step", step))


def test_hooks_are_called_in_order_every_step():
    model, loader, loss_fn = _setup()
    hook = _Recorder()
    train(model, loader, 2, lr=0.1, loss_fn=loss_fn, hooks=[hook], progress=False)
    step_calls = [("extra_loss", (4, 3, 2, 2), (4, 1)), ("after_backward", True)]
    assert hook.calls == [*step_calls, ("after_step", 0), *step_calls, ("after_step", 1)]


def test_extra_loss_is_added_and_hooks_may_implement_only_some_methods():
    model, loader, loss_fn = _setup()
    plain = train(copy.deepcopy(model), loader, 1, lr=0.1, loss_fn=loss_fn, progress=False)

    class OnlyAfterStep:
        def __init__(self):
            self.steps = []

        def after_step(self, model, step):
            self.steps.append(step)

    partial = OnlyAfterStep()
    with_extra = train(
        model,
        loader,
        1,
        lr=0.1,
        loss_fn=loss_fn,
        hooks=[_Recorder(extra=1.5), partial],
        progress=False,
    )
    assert with_extra[0] == pytest.approx(plain[0] + 1.5)
    assert partial.steps == [0]


def test_same_seed_gives_identical_losses():
    model, loader, loss_fn = _setup()
    runs = [
        train(
            copy.deepcopy(model), loader, 7, lr=0.05, optimizer=opt, loss_fn=loss_fn, progress=False
        )
        for opt in ("sgd", "sgd", "adam")
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_loader_is_cycled_and_mode_restored():
    model, loader, loss_fn = _setup(n_batches=2)
    model.eval()
    losses = train(model, loader, 5, lr=0.01, loss_fn=loss_fn, progress=False)
    assert len(losses) == 5 and not model.training


def test_loss_goes_down():
    model, loader, loss_fn = _setup(n_batches=1)
    losses = train(model, loader, 40, lr=0.05, optimizer="adam", loss_fn=loss_fn, progress=False)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_final_ratio(schedule):
    factor = _lr_factor(steps=110, warmup_steps=10, schedule=schedule, final_ratio=0.01)
    assert factor(0) == pytest.approx(0.1)
    assert factor(10) == pytest.approx(1.0)
    assert factor(109) == pytest.approx(0.01)
    mid = 0.505 if schedule == "cosine" else 1 - 0.99 * 0.5
    assert factor(10 + 99 / 2) == pytest.approx(mid)
    values = [factor(s) for s in range(10, 110)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop'"),
        ({"schedule": "step"}, "schedule='step'"),
        ({"steps": -1}, "steps=-1"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match):
    model, loader, loss_fn = _setup()
    options = {"steps": 1, "lr": 0.1, "loss_fn": loss_fn, "progress": False, **kwargs}
    steps = options.pop("steps")
    with pytest.raises(ValueError, match=match):
        train(model, loader, steps, **options)


def test_empty_loader_and_nan_loss_are_reported():
    model, loader, loss_fn = _setup()
    with pytest.raises(ValueError, match="no batch"):
        train(model, [], 1, lr=0.1, loss_fn=loss_fn, progress=False)

    def nan_loss(outputs, targets):
        return outputs.sum() * math.nan, torch.zeros(1)

    with pytest.raises(FloatingPointError, match="at step 0"):
        train(model, loader, 1, lr=0.1, loss_fn=nan_loss, progress=False, desc="fp")


def test_progress_bar_runs(capsys):
    model, loader, loss_fn = _setup()
    train(model, loader, 2, lr=0.1, loss_fn=loss_fn, desc="bar-label", progress=True)
    assert "bar-label" in capsys.readouterr().err


def test_lr_scale_multiplies_the_learning_rate_of_matching_parameters():
    model, loader, loss_fn = _setup()
    start = copy.deepcopy(model)
    plain, scaled = copy.deepcopy(model), copy.deepcopy(model)
    train(plain, loader, 1, lr=0.01, loss_fn=loss_fn, progress=False, weight_decay=0.0)
    train(scaled, loader, 1, lr=0.01, loss_fn=loss_fn, progress=False, weight_decay=0.0, lr_scale={"1.bias": 10.0})
    step = {name: [(dict(m.named_parameters())[name] - dict(start.named_parameters())[name]).detach()
                   for m in (plain, scaled)] for name in ("1.weight", "1.bias")}
    assert torch.equal(step["1.weight"][0], step["1.weight"][1])  # the other parameters are untouched
    assert torch.allclose(step["1.bias"][1], 10 * step["1.bias"][0], rtol=1e-5)
