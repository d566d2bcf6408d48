"""When the normalization of function-preserving GABFusion sites is on: :class:`NormSchedule`.

``rewrite`` (``init="preserve"``) leaves every site's gate ``mix`` at 0, where the site returns
exactly the original fusion. The schedule opens it linearly over the first part of QAT, so the
LayerNorm's effect on training arrives gradually instead of as a jump in the model's outputs,
holds it, and can close it again over the last part ("taper", in the manner of TaperNorm,
arXiv 2602.10408): at ``mix = 0`` the site computes the original fusion again, so ``deploy`` gives
it back as the original op with nothing to fold and no approximation at all::

    mix
    peak ┤    ┌──────────────┐
         │   /                \\
       0 ┼──/                  \\──
         0  ramp          total-taper  total   (optimizer steps)
"""

from __future__ import annotations

from torch import nn

from fxfusion.gabfusion import preserving_sites, set_gate

__all__ = ["NormSchedule"]


class NormSchedule:
    """Drive the ``mix`` gate of every function-preserving GABFusion site over ``total_steps``.

    Call :meth:`step` once after every optimizer step (it also works as a hook of the demo's
    training loop: ``after_step(model, step)``). The gate is a buffer, so changing it needs no
    recompilation under ``torch.compile`` and is saved with the model.

    Args:
        model: the rewritten model (``init="preserve"``; the student, possibly quantized).
        total_steps: the number of QAT optimizer steps.
        ramp: the share of ``total_steps`` over which the gate rises from 0 to ``peak``
            (0: at ``peak`` from the first step).
        taper: the share at the end over which it falls back to 0 (0: stays at ``peak``, and
            ``deploy`` freezes the normalization to its best per-channel fit).
        peak: the gate's top value, in [0, 1] (1: the paper's normalization, γ⊙LN(h)+β).

    Example:
        >>> sched = NormSchedule(qat_model, total_steps=1000, ramp=0.2, taper=0.2)  # doctest: +SKIP
        >>> for step in range(1000):                                                # doctest: +SKIP
        ...     loss.backward(); opt.step(); sched.step()
    """

    def __init__(self, model: nn.Module, total_steps: int, *, ramp: float = 0.25, taper: float = 0.0,
                 peak: float = 1.0) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        for name, v in (("ramp", ramp), ("taper", taper), ("peak", peak)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if ramp + taper > 1.0:
            raise ValueError(f"ramp + taper must be at most 1 (the whole run), got {ramp} + {taper}")
        if not preserving_sites(model):
            raise ValueError(f"{type(model).__name__} has no function-preserving GABFusion site: rewrite it with "
                             "fxfusion.rewrite(model, x) (init='preserve', the default) first")
        self.model, self.total_steps, self.peak = model, total_steps, peak
        self.ramp_steps, self.taper_steps = round(ramp * total_steps), round(taper * total_steps)
        self.steps_done = 0
        set_gate(model, self.value(0))

    def value(self, step: int) -> float:
        """The gate after ``step`` optimizer steps."""
        v = self.peak if self.ramp_steps == 0 else self.peak * min(1.0, step / self.ramp_steps)
        if self.taper_steps and step > self.total_steps - self.taper_steps:
            v = min(v, self.peak * max(0.0, (self.total_steps - step) / self.taper_steps))
        return v

    def step(self) -> float:
        """Advance one optimizer step and set the gate; returns its new value."""
        self.steps_done += 1
        v = self.value(self.steps_done)
        set_gate(self.model, v)
        return v

    def after_step(self, model: nn.Module, step: int) -> None:  # the demo loop's hook protocol
        self.step()

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        set_gate(self.model, self.value(self.steps_done))

    def __repr__(self) -> str:
        return (f"NormSchedule(total_steps={self.total_steps}, ramp_steps={self.ramp_steps}, "
                f"taper_steps={self.taper_steps}, peak={self.peak}, steps_done={self.steps_done})")
