"""Flow matching on the linear path, in the convention of diffusers' flow-matching schedulers and SD3:

    x_t = (1 - t) x_0 + t eps,  t in [0, 1], t = 1 pure noise;  velocity v = dx_t/dt = eps - x_0.

SiT (Ma et al. 2024) writes the same path with its time s = 1 - t (s = 1 is data) and velocity v_SiT = x_0 - eps
= -v; an SiT model's output is the negative of ours at t = 1 - s. Samplers integrate from t = 1 to t = 0 over a
grid of steps + 1 times (uniform, then SD3's shift). Given x_t and v: eps = x_t + (1 - t) v, x_0 = x_t - t v.
Every random draw is torch.randn(..., generator=generator) on the CPU, then moved to the device, as the DDPM samplers.
"""

import math

import torch

from mpdit.diffusion.sampling import stepping

# MP models see ln(sigma)/4 of the path's noise-to-signal ratio sigma = t / (1 - t), clamped to sigma in
# [1e-2, 1e2] (time inputs within +-ln(100)/4 = +-1.15, about DDPM's -1.2..1.3; t within 0.0099..0.990): finite at
# t = 0 and t = 1, and within what training shows the model. EDM2's Fourier features of a time input far outside
# that (logit-normal times put |ln sigma| > 4.6 at 4.6 standard deviations) gave one quickstart-size model
# velocities of 1e3-1e5 at t = 0.999 and 1, and samples of noise; clamped, its samples are digits.
SIGMA_RANGE = (1e-2, 1e2)
TIME_SAMPLINGS = ("logit-normal", "uniform")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps; x0, noise (N, C, H, W), t (N,)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return torch.lerp(x0, noise, t)


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target v = eps - x_0 (N, C, H, W)."""
    return noise - x0


def draw_times(n: int, generator: torch.Generator, sampling: str = "logit-normal", mean: float = 0.0,
               std: float = 1.0) -> torch.Tensor:
    """Training times (n,) float32 in (0, 1): uniform, or logit-normal t = sigmoid(mean + std z) (SD3, section 3.1)."""
    if sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift t' = S t / (1 + (S - 1) t): S > 1 spends more of the steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The sampling times (steps + 1,) float64 from 1 to 0: uniform, then shifted."""
    return shift_times(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def log_sigma_input(t: torch.Tensor) -> torch.Tensor:
    """EDM2's c_noise = ln(sigma) / 4 with sigma = t / (1 - t) clamped to SIGMA_RANGE; (N,) float32."""
    low, high = SIGMA_RANGE
    t = t.double().clamp(low / (1 + low), high / (1 + high))  # sigma = t / (1 - t) within the range
    return ((t / (1 - t)).log() / 4).float()


def input_scale(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's c_in for the path: 1 / sqrt((1 - t)^2 sigma_data^2 + t^2), which brings x_t to unit RMS; (N,) float32."""
    t = t.double()
    return (1 / ((1 - t) ** 2 * sigma_data**2 + t**2).sqrt()).float()


def _steps(grid: torch.Tensor, progress, desc: str):
    """(t, t_next) pairs of the grid, with progress as the DDPM samplers' (``stepping``)."""
    return stepping(list(zip(grid[:-1].tolist(), grid[1:].tolist())), progress, desc)


def _times(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)


@torch.no_grad()
def euler_sample(velocity_fn, x: torch.Tensor, grid: torch.Tensor, progress=False) -> torch.Tensor:
    """Euler ODE steps x <- x + (t_next - t) v(x, t) over the grid; x starts as the noise at grid[0]."""
    for t, t_next in _steps(grid, progress, "euler"):
        x = x + (t_next - t) * velocity_fn(x, _times(t, x))
    return x


@torch.no_grad()
def heun_sample(velocity_fn, x: torch.Tensor, grid: torch.Tensor, progress=False) -> torch.Tensor:
    """Heun's second-order ODE steps (EDM's Algorithm 1): an Euler step, then the average of the velocities at both
    ends; the last step, to t = 0, stays Euler (as EDM). steps steps cost 2 steps - 1 model calls."""
    for t, t_next in _steps(grid, progress, "heun"):
        v = velocity_fn(x, _times(t, x))
        x_euler = x + (t_next - t) * v
        if t_next == 0:
            x = x_euler
        else:
            x = x + (t_next - t) * 0.5 * (v + velocity_fn(x_euler, _times(t_next, x)))
    return x


@torch.no_grad()
def euler_maruyama_sample(velocity_fn, x: torch.Tensor, grid: torch.Tensor, *, generator: torch.Generator,
                          progress=False) -> torch.Tensor:
    """SiT's Euler-Maruyama SDE sampler on the same marginals, with SiT's default diffusion coefficient
    w(t)^2 = 2 t ("sigma" form, norm 1). Reverse-time step from t to t_next = t - h:
    x <- x - h (v - (w^2 / 2) score) + w sqrt(h) z, where score = -eps / t and eps = x + (1 - t) v, so
    (w^2 / 2) score = -eps; the last step is the mean step without noise (SiT's last_step="Mean")."""
    for t, t_next in _steps(grid, progress, "euler-maruyama"):
        v = velocity_fn(x, _times(t, x))
        h = t - t_next
        x_mean = x - h * (v + (x + (1 - t) * v))  # v - (w^2 / 2) score = v + eps
        if t_next == 0:
            x = x_mean
        else:
            z = torch.randn(tuple(x.shape), generator=generator, dtype=x.dtype).to(x.device)
            x = x_mean + math.sqrt(2 * t * h) * z
    return x
