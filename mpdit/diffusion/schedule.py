"""The DiT / ADM noise schedule and EDM2's noise conditioning derived from it."""

import torch


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DiT's linear beta schedule, float64, shape (T,)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def noise_conditioning(num_timesteps: int = 1000) -> torch.Tensor:
    """EDM2's c_noise = ln(sigma_t) / 4 per integer step, sigma_t = sqrt((1 - abar_t) / abar_t); (T,) float32.

    Spans about [-1.2, 1.3] for the linear schedule.
    """
    alphas_cumprod = torch.cumprod(1.0 - linear_betas(num_timesteps), dim=0)
    sigma = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    return (sigma.log() / 4).float()
