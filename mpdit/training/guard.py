"""The divergence guard: a training step whose loss or gradient norm is not finite is skipped on the device.

``DivergenceGuard.found_inf`` turns (loss, grad_norm) into a 0-dim float flag that the fused AdamW reads as
``optimizer.found_inf`` (the hook torch's GradScaler uses): the kernel leaves weights, moments and step count
untouched when the flag is 1. The EMAs then average the unchanged, finite weights, so nothing non-finite reaches
them. The flag and the counters stay on the device: no host synchronisation per step. ``counts`` (one sync) is
read where the loop synchronises anyway (log, checkpoint and snapshot steps), and the loop stops with a one-line
error once the run has been skipping for ``TrainConfig.max_bad_steps`` steps in a row (``Trainer.check_divergence``).

Under DDP the gradient norm is computed from the all-reduced gradients and the loss is the all-reduced mean,
so every rank reaches the same flag.
"""

from collections.abc import Mapping

import torch

from mpdit.errors import MPDiTError


class DivergenceGuard:
    """Per-step non-finite check with a device-side streak and total of skipped steps."""

    def __init__(self, device: torch.device, skipped: int = 0):
        self.streak = torch.zeros((), device=device)  # skipped steps in a row, up to now
        self.skipped = torch.full((), float(skipped), device=device)  # skipped steps in all (kept across resumes)

    def found_inf(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """1.0 when the step must be skipped (loss or gradient norm not finite), else 0.0; updates the counters."""
        bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm.detach())).float()
        self.streak = (self.streak + 1) * bad
        self.skipped += bad
        return bad

    def counts(self) -> tuple[int, int]:
        """(skipped steps in a row, skipped steps in all): one host synchronisation."""
        streak, skipped = torch.stack([self.streak, self.skipped]).tolist()
        return int(streak), int(skipped)


def nonfinite_tensor(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity, or None (one host synchronisation)."""
    names = [name for name, t in tensors.items() if t.is_floating_point()]
    if not names:
        return None
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).cpu()
    return None if bool(finite.all()) else names[int((~finite).nonzero()[0])]


def require_finite(tensors: Mapping[str, torch.Tensor], what: str, hint: str = "") -> None:
    """MPDiTError naming the first tensor of ``what`` that is not finite (nothing is written from it)."""
    bad = nonfinite_tensor(tensors)
    if bad is not None:
        raise MPDiTError(f"{what} has non-finite values (first: {bad}), so it was not written{hint}")


def json_safe(value):
    """``value`` with every NaN or infinity (at any depth of dicts and lists) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
