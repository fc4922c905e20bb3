"""Learning-rate schedules: small picklable callables ``schedule(step) -> lr``.

Convention (one, used everywhere): ``step`` is the 0-based index of the optimizer step about to
be taken (0 for the first ``optimizer.step()``), and the callable returns the *absolute*
learning rate for that step. The training loop sets it before each step::

    set_lr(optimizer, schedule(step)); optimizer.step()

For ``torch.optim.lr_scheduler.LambdaLR`` (which wants a multiplier of the initial lr) pass
``schedule.multiplier`` and create the optimizer with ``lr=schedule.lr``.
"""

import math
from dataclasses import dataclass

import torch

from mpdit.errors import MPDiTError

SCHEDULES = ("constant", "edm2")


def _check(lr: float, warmup_steps: int) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise MPDiTError(f"learning rate must be a positive number, got {lr!r}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise MPDiTError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp min((step + 1) / warmup_steps, 1): the first step gets lr / warmup_steps, not 0."""
    if step < 0:
        raise MPDiTError(f"schedule step must be >= 0 (0 = first optimizer step), got {step}")
    return min((step + 1) / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


@dataclass(frozen=True)
class Constant:
    """lr, after an optional linear warm-up over ``warmup_steps`` optimizer steps."""

    lr: float
    warmup_steps: int = 0

    def __post_init__(self):
        _check(self.lr, self.warmup_steps)

    def __call__(self, step: int) -> float:
        return self.lr * _warmup(step, self.warmup_steps)

    def multiplier(self, step: int) -> float:
        """self(step) / lr, the LambdaLR form."""
        return self(step) / self.lr


@dataclass(frozen=True)
class EDM2:
    """EDM2's schedule in optimizer steps: warm-up, then inverse square-root decay after ``t_ref``.

    lr(step) = lr * min((step + 1) / warmup_steps, 1) / sqrt(max(step / t_ref, 1)).
    (EDM2 counts t in images seen before the step; here t = step, the steps already taken.)
    """

    lr: float
    t_ref: int
    warmup_steps: int = 0

    def __post_init__(self):
        _check(self.lr, self.warmup_steps)
        if not (isinstance(self.t_ref, (int, float)) and math.isfinite(self.t_ref) and self.t_ref > 0):
            raise MPDiTError(f"the edm2 schedule needs t_ref > 0 (the step where the 1/sqrt decay starts), got {self.t_ref!r}")

    def __call__(self, step: int) -> float:
        # EDM2 learning_rate_schedule: lr / sqrt(max(t / t_ref, 1)) * min(t / rampup, 1)
        return self.lr * _warmup(step, self.warmup_steps) / math.sqrt(max(step / self.t_ref, 1.0))

    def multiplier(self, step: int) -> float:
        """self(step) / lr, the LambdaLR form."""
        return self(step) / self.lr


def make_schedule(name: str, lr: float, warmup_steps: int = 0, t_ref: int | None = None) -> Constant | EDM2:
    """Schedule by name: "constant" (t_ref ignored) or "edm2" (t_ref > 0 required), steps as in the module doc."""
    if name == "constant":
        return Constant(lr, warmup_steps)
    if name == "edm2":
        return EDM2(lr, t_ref if t_ref is not None else 0, warmup_steps)
    raise MPDiTError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


RECIPES = ("authors", "edm2")


def recipe_options(name: str, steps: int, batch_size: int) -> dict:
    """Warm-up, t_ref and gradient clipping of a named recipe for the edm2 schedule, for a run of ``steps``
    optimizer steps of ``batch_size`` images.

    - ``authors``: the paper authors' training script (DESIGN.md section 4): warm-up over steps/150, 1/sqrt decay
      from steps/10, gradient norm clipped at 0.1 (400k steps: 2,667 and 40,000).
    - ``edm2``: EDM2's constants, counted in images: warm-up over 10M images, t_ref = 70k batches of 2048 images
      (batch 256: 39,062 and 560,000 steps, so no decay within 400k steps); no clipping.
    """
    if name == "authors":
        return dict(warmup_steps=round(steps / 150), t_ref=max(round(steps / 10), 1), grad_clip=0.1)
    if name == "edm2":
        return dict(warmup_steps=10_000_000 // batch_size, t_ref=70_000 * 2048 // batch_size, grad_clip=None)
    raise MPDiTError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr (call before optimizer.step())."""
    for group in optimizer.param_groups:
        group["lr"] = lr
