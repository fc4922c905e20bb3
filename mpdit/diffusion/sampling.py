"""Ancestral (DDPM) and DDIM samplers for GaussianDiffusion, deterministic given a torch.Generator.

model_fn(x_t, t) -> (N, 2C or C, H, W) is called with x_t (N, C, H, W) and t a long tensor (N,) of
ORIGINAL-scale steps; the DDPM objective (mpdit.diffusion.objectives) turns them into the model's time input, so
sample through it: objective.sample(lambda x, s: model.guided_forward(x, s, y, scale), ...). Classifier-free
guidance lives in the model. Every random draw is
torch.randn(..., generator=generator) on the CPU, then moved to `device`, so a seed gives the same
noise on any device.
"""

import torch

from mpdit.diffusion.gaussian import GaussianDiffusion, respace
from mpdit.errors import MPDiTError

SAMPLERS = ("ddpm", "ddim")


def _randn(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from `generator`, then moved to `device`."""
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)


def stepping(items, progress, desc: str):
    """The sampling loop's items: wrapped in a tqdm bar of their own when progress is True; when progress is a tqdm
    bar (a caller's bar over several sampling loops), that bar advances by one per item."""
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, total=len(items))
    if progress:
        return _advancing(items, progress)
    return items


def _advancing(items, bar):
    """Yield the items, advancing `bar` by one after each step is done."""
    for item in items:
        yield item
        bar.update(1)


def _steps(diffusion: GaussianDiffusion, progress, desc: str):
    """Indices T-1, ..., 0, with progress as ``stepping``."""
    return stepping(range(diffusion.num_timesteps - 1, -1, -1), progress, desc)


def _start(shape, generator, device, noise) -> torch.Tensor:
    """The initial x_T ~ N(0, I) of shape (N, C, H, W), or the given noise."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise MPDiTError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return noise.to(device)
    return _randn(shape, generator, device)


@torch.no_grad()
def ddpm_sample(diffusion: GaussianDiffusion, model_fn, shape, *, generator: torch.Generator, device="cpu", noise=None,
                clip_denoised: bool = False, progress=False) -> torch.Tensor:
    """Ancestral sampling x_T -> x_0 over all steps of `diffusion` (respace it first); returns x_0 (N, C, H, W)."""
    x = _start(shape, generator, device, noise)
    for i in _steps(diffusion, progress, "ddpm"):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = diffusion.p_mean_variance(model_fn(x, diffusion.model_timesteps(t)), x, t, clip_denoised=clip_denoised)
        x = out["mean"]
        if i > 0:  # x_{t-1} = mu + sigma z, no noise at the last step
            x = x + torch.exp(0.5 * out["log_variance"]) * _randn(x.shape, generator, x.device, x.dtype)
    return x


@torch.no_grad()
def ddim_sample(diffusion: GaussianDiffusion, model_fn, shape, *, eta: float = 0.0, generator: torch.Generator, device="cpu",
                noise=None, clip_denoised: bool = False, progress=False) -> torch.Tensor:
    """DDIM sampling over all steps of `diffusion` (respace it first), ADM's step; returns x_0 (N, C, H, W).

    eta = 0 is deterministic given x_T; eta = 1 matches the DDPM posterior variance.
    """
    x = _start(shape, generator, device, noise)
    for i in _steps(diffusion, progress, "ddim"):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = diffusion.p_mean_variance(model_fn(x, diffusion.model_timesteps(t)), x, t, clip_denoised=clip_denoised)
        pred_x0 = out["pred_x0"]
        eps = diffusion.eps_from_pred_x0(x, t, pred_x0)  # eps recomputed from the (possibly clipped) pred_x0
        abar, abar_prev = diffusion._extract("alphas_cumprod", t, x), diffusion._extract("alphas_cumprod_prev", t, x)
        # sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)
        sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        # x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        x = abar_prev.sqrt() * pred_x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if i > 0 and eta > 0:
            x = x + sigma * _randn(x.shape, generator, x.device, x.dtype)
    return x


def sample(model_fn, shape, *, sampler: str = "ddpm", steps: int | str = 250, generator: torch.Generator, device="cpu",
           learn_sigma: bool = True, progress=False, eta: float = 0.0, clip_denoised: bool = False) -> torch.Tensor:
    """Sample x_0 (N, C, H, W) = shape from DiT's 1000-step diffusion respaced to `steps` (an int: evenly
    spaced as ADM; or ADM's "ddimN" / "n1,n2" strings) with sampler "ddpm" or "ddim" (eta for DDIM).
    ``progress``: True for a bar over the steps, or a tqdm bar to advance by one per step (see ``_steps``)."""
    if sampler not in SAMPLERS:
        raise MPDiTError(f"unknown sampler {sampler!r}: choose ddpm or ddim")
    diffusion = respace(GaussianDiffusion.dit(1000, learn_sigma=learn_sigma), steps)
    kw = dict(generator=generator, device=device, clip_denoised=clip_denoised, progress=progress)
    if sampler == "ddpm":
        return ddpm_sample(diffusion, model_fn, shape, **kw)
    return ddim_sample(diffusion, model_fn, shape, eta=eta, **kw)
