"""The simple gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
Training", section 2.2) of a checkpoint's training loss: B_simple = tr(Sigma) / |G|^2, where G is the true
gradient and Sigma the covariance of a single example's gradient. It is the batch size at which the noise of a
gradient estimate is as large as the gradient itself: a larger B means noisier gradients for the same batch.

Estimated from K independent mini-batch gradients g_1..g_K of b examples each (fixed seeds): the mean g_bar
estimates G, the per-coordinate sample variance of the g_k summed estimates tr(Sigma) / b, so
tr(Sigma) = b * sum_i var_k(g_k,i), and |G|^2 = |g_bar|^2 - tr(Sigma) / (b K) (unbiased: |g_bar|^2 overestimates
|G|^2 by the variance of the mean). The moments are accumulated coordinate-wise in float64, so memory is three
copies of the parameters whatever K.

Per noise level: the same with every example's time drawn uniformly within one of ``bins`` equal bins of the
objective's time (DDPM: steps; flow: t), which shows where along the noise levels the gradient is noisy.
"""

import torch

from mpdit.diffusion.objectives import Objective
from mpdit.errors import MPDiTError
from mpdit.model.dit import MPDiT
from mpdit.training.train import noised_batch


class GradientMoments:
    """Running coordinate-wise sum and sum of squares (float64) of flattened gradients."""

    def __init__(self):
        self.count, self.total, self.squares = 0, None, None

    def add(self, gradient: torch.Tensor) -> None:
        g = gradient.detach().double().flatten()
        if self.total is None:
            self.total, self.squares = torch.zeros_like(g), torch.zeros_like(g)
        self.total += g
        self.squares += g * g
        self.count += 1

    def noise_scale(self, batch_size: int) -> dict:
        """{"b_simple", "trace_sigma", "grad_norm_sq", "grad_norm_sq_biased"} from the K >= 2 gradients added;
        b_simple is None where the unbiased |G|^2 is not positive (the mean gradient is lost in the noise at this K)."""
        k = self.count
        if k < 2:
            raise MPDiTError(f"the gradient noise scale needs at least 2 batches, got {k}")
        mean = self.total / k
        variance = (self.squares - k * mean * mean).clamp(min=0) / (k - 1)  # per coordinate, unbiased
        trace_sigma = batch_size * variance.sum().item()
        biased = mean.square().sum().item()
        norm_sq = biased - trace_sigma / (batch_size * k)
        return {"b_simple": trace_sigma / norm_sq if norm_sq > 0 else None, "trace_sigma": trace_sigma,
                "grad_norm_sq": norm_sq, "grad_norm_sq_biased": biased}


def flat_gradient(model: MPDiT) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def batch_gradient(model: MPDiT, objective: Objective, data, index: torch.Tensor, t: torch.Tensor,
                   generator: torch.Generator, *, min_snr_gamma: float, device) -> torch.Tensor:
    """The gradient of the training loss (as the trainer computes it, label dropout included) on one batch."""
    x0, y, noise = noised_batch(data, index, model.config, generator)
    x0, y, t, noise = (v.to(device) for v in (x0, y, t, noise))
    model.zero_grad(set_to_none=True)
    losses = objective.training_losses(lambda x, s: model(x, s, y), x0, t, noise, min_snr_gamma=min_snr_gamma)
    losses["loss"].mean().backward()
    return flat_gradient(model)


def gradient_noise_scale(model: MPDiT, objective: Objective, data, *, batches: int = 32, batch_size: int = 64,
                         bins: int = 5, seed: int = 0, min_snr_gamma: float = 0.0, device="cpu") -> dict:
    """B_simple in total (times drawn as in training) and per noise-level bin, on the model's current weights in
    training mode; batch k of bin j draws its images, times, noise and label dropout from a generator seeded by
    (seed, j, k). Returns {"total": {...}, "bins": [{"range", ...}], "batches", "batch_size", "seed"}."""
    if batches < 2 or batch_size < 1 or bins < 1:
        raise MPDiTError("the gradient noise scale needs --batches >= 2, --batch-size >= 1 and --bins >= 1")
    model.train()
    levels = objective.time_bins(bins)
    result = {"batches": batches, "batch_size": batch_size, "seed": seed, "bins": []}
    for j, level in enumerate([None, *levels]):
        moments = GradientMoments()
        for k in range(batches):
            generator = torch.Generator().manual_seed((seed * 1_000_003 + j) * 100_003 + k)
            index = torch.randint(0, len(data), (batch_size,), generator=generator)
            t = objective.draw_times(batch_size, generator) if level is None else \
                objective.draw_times_between(batch_size, generator, *level)
            moments.add(batch_gradient(model, objective, data, index, t, generator, min_snr_gamma=min_snr_gamma,
                                       device=device))
        scale = moments.noise_scale(batch_size)
        if level is None:
            result["total"] = scale
        else:
            result["bins"].append({"range": list(level), **scale})
    model.zero_grad(set_to_none=True)
    return result
