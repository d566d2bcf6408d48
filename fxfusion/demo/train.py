"""One small, deterministic training loop for the demo's FP, QAT and fine-tune runs and benchmarks.

Method-specific work plugs in through hooks instead of copies of the loop. One step reads:

    outputs = model(images)
    loss    = loss_fn(outputs, targets)[0] + Σ hook.extra_loss(model, images, outputs)
    loss.backward()
    hook.after_backward(model)          # e.g. α balancing, gradient statistics
    clip_grad_norm_(params, max_norm)   # 10 by default
    optimizer.step(); scheduler.step()
    hook.after_step(model, step)        # e.g. EMA updates, logging

A hook is any object; each of the three methods is optional (:class:`TrainHook` documents them and
may be subclassed). The learning rate follows a linear warm-up, then a cosine or linear decay to
``lr · final_lr_ratio``. Weight decay applies to weight matrices and kernels only, not to biases,
norm parameters or quantizer scales (parameters with fewer than 2 dims).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["TrainHook", "train"]

_log = logging.getLogger(__name__)

_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("cosine", "linear")


class TrainHook:
    """Optional callbacks of :func:`train`; subclass it or pass any object with some of these."""

    def extra_loss(
        self, model: nn.Module, images: torch.Tensor, outputs: Any
    ) -> torch.Tensor | None:
        """A scalar added to the task loss before backward (e.g. distillation), or None."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Runs after backward, before clipping and the optimizer step (e.g. α balancing)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Runs after the optimizer step; ``step`` counts from 0."""


def train(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    lr: float,
    optimizer: str = "sgd",
    loss_fn: Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    hooks: Sequence[TrainHook] = (),
    desc: str = "train",
    progress: bool = True,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    final_lr_ratio: float = 0.01,
    weight_decay: float = 5e-4,
    max_grad_norm: float = 10.0,
    seed: int | None = 0,
    lr_scale: Mapping[str, float] | None = None,
) -> list[float]:
    """Train ``model`` for ``steps`` optimizer steps, cycling over ``loader`` as often as needed.

    Args:
        model: trained in place, in train mode; its previous mode is restored at the end.
        loader: yields ``(images, targets)`` batches, e.g. from
            :func:`fxfusion.demo.data.make_loader`.
        steps: number of optimizer steps.
        lr: peak learning rate.
        optimizer: ``"sgd"`` (momentum 0.937, Nesterov) or ``"adam"`` (betas 0.937, 0.999).
        loss_fn: ``loss_fn(outputs, targets) -> (loss, items)``, e.g. a
            :class:`fxfusion.demo.loss.YoloLoss`.
        hooks: objects with any of the :class:`TrainHook` methods, called in order.
        desc: label of the progress bar and of the log line.
        progress: show a tqdm progress bar.
        schedule: ``"cosine"`` or ``"linear"`` decay after the warm-up.
        warmup_steps: steps of linear warm-up from 0.1·lr.
        final_lr_ratio: the last step's learning rate, as a fraction of ``lr``.
        weight_decay: L2 decay on parameters with 2 or more dims.
        max_grad_norm: gradient clipping norm (over all parameters).
        seed: seeds torch's global RNG at the start, for reproducible runs; None leaves it alone.
        lr_scale: ``{name suffix: factor}``: parameters whose name ends with a suffix train at
            ``factor · lr`` (e.g. ``{"log_alpha": 10}`` for GABFusion's α), without weight decay.

    Returns:
        The total loss (task plus extra losses) of every step.

    Raises:
        ValueError: a bad option, or a loader that yields nothing.
        FloatingPointError: the loss became NaN or infinite; the message names the step.

    Example:
        Two steps of a tiny detector on four images:

        >>> from fxfusion import zoo
        >>> from fxfusion.demo.data import ShapesDataset, make_loader
        >>> from fxfusion.demo.loss import YoloLoss
        >>> from fxfusion.demo.train import train
        >>> model = zoo.build("yolov5", nc=3)
        >>> loader = make_loader(ShapesDataset("train", n=4, img_size=64), batch_size=2)
        >>> losses = train(model, loader, 2, lr=0.01, loss_fn=YoloLoss(model), progress=False)
        >>> len(losses), all(loss > 0 for loss in losses)
        (2, True)

        A real run, as the demo's FP32 phase (300 steps on 512 images, a minute or more on a CPU):

        >>> model = zoo.build("yolov5", nc=3, img_size=96, width_multiple=0.125)  # doctest: +SKIP
        >>> loader = make_loader(ShapesDataset("train", n=512), batch_size=16)  # doctest: +SKIP
        >>> losses = train(model, loader, 300, lr=0.01, loss_fn=YoloLoss(model), desc="fp32")  # doctest: +SKIP
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0.")
    if lr <= 0:
        raise ValueError(f"lr={lr} must be > 0.")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not known; use one of {_OPTIMIZERS}.")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not known; use one of {_SCHEDULES}.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0.")
    if seed is not None:
        torch.manual_seed(seed)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no parameter that requires grad; nothing to train."
        )
    opt = _make_optimizer(optimizer, named, lr, weight_decay, lr_scale or {})
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_factor(steps, warmup_steps, schedule, final_lr_ratio)
    )
    device = params[0].device
    hook_calls = {
        name: [getattr(h, name) for h in hooks if callable(getattr(h, name, None))]
        for name in ("extra_loss", "after_backward", "after_step")
    }

    was_training = model.training
    model.train()
    losses: list[float] = []
    batches = _cycle(loader)
    bar = _progress_bar(steps, desc, progress)
    try:
        for step in range(steps):
            images, targets = next(batches)
            images, targets = images.to(device), targets.to(device)
            outputs = model(images)
            loss, items = loss_fn(outputs, targets)
            for extra_loss in hook_calls["extra_loss"]:
                extra = extra_loss(model, images, outputs)
                if extra is not None:
                    loss = loss + extra
            if not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(
                    f"{desc}: the loss is {loss.item()} at step {step}/{steps} (items "
                    f"{[round(v, 4) for v in items.tolist()]}); lower lr (now {lr}) or check the "
                    "data."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for after_backward in hook_calls["after_backward"]:
                after_backward(model)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            scheduler.step()
            for after_step in hook_calls["after_step"]:
                after_step(model, step)
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if losses:
        _log.info("%s: %d steps, loss %.4f -> %.4f", desc, steps, losses[0], losses[-1])
    return losses


def _make_optimizer(
    name: str, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
    lr_scale: Mapping[str, float],
) -> torch.optim.Optimizer:
    """SGD or Adam, with weight decay on parameters of 2 or more dims only, and per-suffix lr factors."""
    scaled = {suffix: [p for n, p in named if n.endswith(suffix)] for suffix in lr_scale}
    taken = {id(p) for ps in scaled.values() for p in ps}
    rest = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
        *({"params": ps, "weight_decay": 0.0, "lr": lr * lr_scale[suffix]} for suffix, ps in scaled.items()),
    ]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.937, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.937, 0.999))
    raise ValueError(f"optimizer={name!r} is not known; use one of {_OPTIMIZERS}.")


def _lr_factor(
    steps: int, warmup_steps: int, schedule: str, final_ratio: float
) -> Callable[[int], float]:
    """The multiplier of lr at each step: warm-up from 0.1, then decay to ``final_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.1 + 0.9 * step / warmup_steps
        span = max(steps - warmup_steps - 1, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        if schedule == "cosine":
            return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - final_ratio) * progress

    return factor


def _cycle(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``loader``, restarting it whenever it runs out."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yielded no batch; check the dataset size and drop_last.")


def _progress_bar(steps: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over ``steps``, or None when progress is off."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc=desc, leave=True, dynamic_ncols=True)
