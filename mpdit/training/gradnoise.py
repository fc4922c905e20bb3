"""The simple gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
Training", section 2.2) of a checkpoint's training loss: B_simple = tr(Sigma) / |G|^2, where G is the true
gradient and Sigma the covariance of a single example's gradient. It is the batch size at which the noise of a
gradient estimate is as large as the gradient itself: a larger B means noisier gradients for the same batch.

Estimated from K independent mini-batch gradients g_1..g_K of b examples each (fixed seeds): the mean g_bar
estimates G, the per-coordinate sample variance of the g_k summed estimates tr(Sigma) / b, so
tr(Sigma) = b * sum_i var_k(g_k,i), and |G|^2 = |g_bar|^2 - tr(Sigma) / (b K) (unbiased: |g_bar|^2 overestimates
|G|^2 by the variance of the mean). Both follow from the running sum of the g_k and the sum of their squared
norms (float64): sum_i var_k(g_k,i) = (sum_k |g_k|^2 - |sum_k g_k|^2 / K) / (K - 1). The coordinate-wise sum of
squares is kept too, for bf16_gradient_error's per-tensor variance: memory is three copies of the parameters
whatever K.

Its standard error is the delete-one-batch jackknife (Efron and Stein 1981): B recomputed from the K - 1 batches
left when batch k is dropped, se = sqrt((K - 1) / K * sum_k (B_-k - mean B_-k)^2). B is a function of two scalars,
sum_k |g_k|^2 and |sum_k g_k|^2, so each B_-k needs only |g_k|^2 and <sum_k g_k, g_k>; the sum is known after the
last batch, so a second pass recomputes each seeded batch gradient for its dot product: the measurement costs two
gradients per batch, and no more memory.

Per noise level: the same with every example's time drawn uniformly within one of ``bins`` equal bins of the
objective's time (DDPM: steps; flow: t), which shows where along the noise levels the gradient is noisy.

The same batches also measure what bf16 autocast does to the gradient (bf16_gradient_error): its rounding error
set against the batch's own sampling noise, tr(Sigma) / b.
"""

import math
import statistics

import torch

from mpdit.diffusion.objectives import Objective
from mpdit.errors import MPDiTError
from mpdit.model.dit import MPDiT
from mpdit.training.train import noised_batch


class GradientMoments:
    """Running coordinate-wise sum and sum of squares (float64) of flattened gradients."""

    def __init__(self):
        self.count, self.total, self.squares, self.norms_sq = 0, None, None, []

    def add(self, gradient: torch.Tensor) -> None:
        g = gradient.detach().double().flatten()
        if self.total is None:
            self.total, self.squares = torch.zeros_like(g), torch.zeros_like(g)
        self.total += g
        self.squares += g * g
        self.norms_sq.append(g.square().sum().item())
        self.count += 1

    def variance(self) -> torch.Tensor:
        """The unbiased per-coordinate variance of the gradients added (K >= 2 of them)."""
        k = self.count
        if k < 2:
            raise MPDiTError(f"the gradient noise scale needs at least 2 batches, got {k}")
        mean = self.total / k
        return (self.squares - k * mean * mean).clamp(min=0) / (k - 1)

    def noise_scale(self, batch_size: int) -> dict:
        """{"b_simple", "trace_sigma", "grad_norm_sq", "grad_norm_sq_biased"} from the K >= 2 gradients added;
        b_simple is None where the unbiased |G|^2 is not positive (the mean gradient is lost in the noise at this K)."""
        if self.count < 2:
            raise MPDiTError(f"the gradient noise scale needs at least 2 batches, got {self.count}")
        return noise_scale_from_sums(self.count, batch_size, sum(self.norms_sq), self.total.square().sum().item())

    def jackknife_error(self, batch_size: int, dots: list[float]) -> float | None:
        """The delete-one-batch jackknife standard error of B_simple; dots[k] = <sum of the gradients added, g_k>.
        None with fewer than 3 gradients or where a B_-k is not measurable."""
        k = self.count
        if k < 3:
            return None
        norms_total, sum_sq = sum(self.norms_sq), self.total.square().sum().item()
        left_out = [noise_scale_from_sums(k - 1, batch_size, norms_total - n, sum_sq - 2 * d + n)["b_simple"]
                    for n, d in zip(self.norms_sq, dots)]
        if None in left_out:
            return None
        mean = statistics.fmean(left_out)
        return math.sqrt((k - 1) / k * sum((b - mean) ** 2 for b in left_out))


def noise_scale_from_sums(count: int, batch_size: int, norms_sq_total: float, sum_sq: float) -> dict:
    """GradientMoments.noise_scale's dict for K = count gradients from two scalars, sum_k |g_k|^2 and |sum_k g_k|^2:
    sum_i var_k(g_k,i) = (sum_k |g_k|^2 - |sum_k g_k|^2 / K) / (K - 1), times b for tr(Sigma);
    |G|^2 = |sum_k g_k|^2 / K^2 - tr(Sigma) / (b K); b_simple None where |G|^2 is not positive."""
    trace_sigma = batch_size * (norms_sq_total - sum_sq / count) / (count - 1)
    biased = sum_sq / count ** 2
    norm_sq = biased - trace_sigma / (batch_size * count)
    return {"b_simple": trace_sigma / norm_sq if norm_sq > 0 else None, "trace_sigma": trace_sigma,
            "grad_norm_sq": norm_sq, "grad_norm_sq_biased": biased}


def gradient_parameters(model: MPDiT) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that hold a gradient, with their names, in flat_gradient's order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.grad is not None]


def flat_gradient(model: MPDiT) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for _, p in gradient_parameters(model)])


def batch_gradient(model: MPDiT, objective: Objective, data, index: torch.Tensor, t: torch.Tensor,
                   generator: torch.Generator, *, min_snr_gamma: float, device) -> torch.Tensor:
    """The gradient of the training loss (as the trainer computes it, label dropout included) on one batch."""
    x0, y, noise = noised_batch(data, index, model.config, generator)
    x0, y, t, noise = (v.to(device) for v in (x0, y, t, noise))
    model.zero_grad(set_to_none=True)
    losses = objective.training_losses(lambda x, s: model(x, s, y), x0, t, noise, min_snr_gamma=min_snr_gamma)
    losses["loss"].mean().backward()
    return flat_gradient(model)


def seeded_batch_gradient(model: MPDiT, objective: Objective, data, seed: int, j: int, k: int, batch_size: int,
                          level: tuple | None, **options) -> torch.Tensor:
    """batch_gradient on batch k of bin j (level: its time range; None: times drawn as in training), whose images,
    times, noise and label dropout all come from a generator seeded by (seed, j, k)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + j) * 100_003 + k)
    index = torch.randint(0, len(data), (batch_size,), generator=generator)
    t = objective.draw_times(batch_size, generator) if level is None else \
        objective.draw_times_between(batch_size, generator, *level)
    return batch_gradient(model, objective, data, index, t, generator, **options)


def gradient_noise_scale(model: MPDiT, objective: Objective, data, *, batches: int = 32, batch_size: int = 64,
                         bins: int = 5, seed: int = 0, min_snr_gamma: float = 0.0, device="cpu") -> dict:
    """B_simple and its jackknife standard error (b_simple_se) in total (times drawn as in training) and per
    noise-level bin, on the model's current weights in training mode; batch k of bin j draws its images, times,
    noise and label dropout from a generator seeded by (seed, j, k), so the second pass (the jackknife's dot
    products) sees the same gradients. Returns {"total": {...}, "bins": [{"range", ...}], "batches",
    "batch_size", "seed"}."""
    if batches < 2 or batch_size < 1 or bins < 1:
        raise MPDiTError("the gradient noise scale needs --batches >= 2, --batch-size >= 1 and --bins >= 1")
    model.train()
    levels = objective.time_bins(bins)
    result = {"batches": batches, "batch_size": batch_size, "seed": seed, "bins": []}
    for j, level in enumerate([None, *levels]):
        moments = GradientMoments()

        def gradient(k):
            return seeded_batch_gradient(model, objective, data, seed, j, k, batch_size, level,
                                         min_snr_gamma=min_snr_gamma, device=device)

        for k in range(batches):
            moments.add(gradient(k))
        dots = [moments.total.dot(gradient(k).double().flatten()).item() for k in range(batches)]
        scale = {**moments.noise_scale(batch_size), "b_simple_se": moments.jackknife_error(batch_size, dots)}
        if level is None:
            result["total"] = scale
        else:
            result["bins"].append({"range": list(level), **scale})
    model.zero_grad(set_to_none=True)
    return result


LARGEST = 5  # bf16_gradient_error's worst parameter tensors


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """|value - reference| / |reference| (Frobenius), in float32."""
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def bf16_gradient_error(model: MPDiT, objective: Objective, data, *, batches: int = 8, batch_size: int = 64,
                        seed: int = 0, min_snr_gamma: float = 0.0, device="cpu") -> dict:
    """The training gradient under bf16 autocast against fp32's on the same K batches (drawn as
    gradient_noise_scale's total), model in training mode:
    gradient_error: |g_bf16 - g_fp32| / |g_fp32|, the mean over the batches;
    error_over_noise: the mean |g_bf16 - g_fp32|^2 over tr(Sigma) / b, the variance of a batch gradient of b
    examples (estimated from the same K fp32 gradients): under 1, bf16's rounding adds less noise than the batch;
    output_errors: the relative error of each block's output and of the model's output, first batch;
    output_scale_errors: how much larger (> 0) or smaller the bf16 outputs are along the fp32 ones, a bias where
    the relative error is noise: <bf16, fp32> / |fp32|^2 - 1;
    worst_parameters: the LARGEST parameter tensors whose own error_over_noise is highest: where the error sits."""
    if batches < 2 or batch_size < 1:
        raise MPDiTError("the bf16 gradient error needs --batches >= 2 and --batch-size >= 1")
    device = torch.device(device)
    model.train()
    outputs: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        return lambda module, args, output: outputs.setdefault(name, []).append(output.detach().float())

    modules = [*((f"block {i}", block) for i, block in enumerate(model.blocks)), ("output", model)]
    hooks = [module.register_forward_hook(keep(name)) for name, module in modules]
    moments, errors, error_squares = GradientMoments(), [], 0.0
    try:
        for k in range(batches):
            gradients = []
            for bf16 in (False, True):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    gradients.append(seeded_batch_gradient(model, objective, data, seed, 0, k, batch_size, None,
                                                           min_snr_gamma=min_snr_gamma, device=device))
            if k == 0:  # the activations of the first batch only; the gradient's layout is the same for every batch
                for hook in hooks:
                    hook.remove()
                layout = [(name, p.numel()) for name, p in gradient_parameters(model)]
            reference, low = gradients
            moments.add(reference)
            errors.append(relative_error(low, reference))
            error_squares = error_squares + (low.double() - reference.double()).square()  # per coordinate
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
    variance, error_squares = moments.variance(), error_squares / batches  # both per coordinate
    names, sizes = zip(*layout)
    ratios = {name: (error.sum() / noise.sum()).item() for name, error, noise in
              zip(names, error_squares.split(sizes), variance.split(sizes))}
    worst = sorted(ratios, key=ratios.get, reverse=True)[:LARGEST]
    return {"batches": batches, "batch_size": batch_size, "seed": seed, "gradient_error": statistics.fmean(errors),
            "error_over_noise": (error_squares.sum() / variance.sum()).item(),
            "output_errors": {name: relative_error(low, reference) for name, (reference, low) in outputs.items()},
            "output_scale_errors": {name: ((low * reference).sum() / reference.square().sum() - 1).item()
                                    for name, (reference, low) in outputs.items()},
            "worst_parameters": {name: ratios[name] for name in worst}}
