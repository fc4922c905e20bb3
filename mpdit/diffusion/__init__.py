"""DiT / ADM Gaussian diffusion: schedule, forward and reverse process, loss, respacing, samplers."""

from mpdit.diffusion.gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    respace,
    space_timesteps,
)
from mpdit.diffusion.sampling import SAMPLERS, ddim_sample, ddpm_sample, sample
from mpdit.diffusion.schedule import linear_betas, noise_conditioning

__all__ = [
    "GaussianDiffusion",
    "SAMPLERS",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "linear_betas",
    "mean_flat",
    "noise_conditioning",
    "normal_kl",
    "respace",
    "sample",
    "space_timesteps",
]
