"""DiT / ADM Gaussian diffusion: forward process, learned-range reverse process, training loss, respacing.

Conventions: images x are (N, C, H, W) (any shape (N, ...) works), t is a long tensor (N,) of indices
into this diffusion's own steps 0..T-1. The model always sees ORIGINAL-scale timesteps:
timestep_map[t] for a respaced diffusion, t otherwise. Schedule arrays are kept in float64 (T,);
per-sample values are gathered and cast to the input's dtype (at least float32).
"""

import math

import torch

from mpdit.diffusion.schedule import linear_betas
from mpdit.errors import MPDiTError

# ----------------------------------------------------------------------------
# Helpers.


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the first: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats; arguments broadcast."""
    # KL = 1/2 (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^-lv2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Elementwise log-probability (nats) of data x in [-1, 1], quantized to 256 levels (bin width 2/255),
    under N(means, e^(2 log_scales)). The edge bins take the whole tail. Same shape as x.

    Uses the exact normal CDF (torch.special.ndtr / log_ndtr) where ADM uses a tanh approximation.
    """
    centered, inv_std = x - means, torch.exp(-log_scales)
    upper, lower = inv_std * (centered + 1 / 255), inv_std * (centered - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(z < upper): bin at x = -1
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(z > lower): bin at x = +1
    log_delta = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))  # interior bins
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


# ----------------------------------------------------------------------------
# The diffusion.


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with epsilon prediction (ADM / DiT).

    betas: (T,) float64 in (0, 1]. learn_sigma: the model outputs 2C channels, eps then v in [-1, 1]
    interpolating the log variance between the clipped posterior variance and beta_t (ADM's
    LEARNED_RANGE); otherwise the variance is fixed to beta_t (ADM's FIXED_LARGE, DiT's default).
    timestep_map: (T,) long, the original step of each step of a respaced diffusion (None: identity).
    """

    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True, timestep_map: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise MPDiTError("betas must be a non-empty 1-D tensor with values in (0, 1]")
        T = len(betas)
        if timestep_map is not None:
            timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).detach().cpu()
            if timestep_map.shape != (T,):
                raise MPDiTError(f"timestep_map must have one entry per step ({T}), got shape {tuple(timestep_map.shape)}")
        self.num_timesteps, self.learn_sigma, self.timestep_map = T, bool(learn_sigma), timestep_map
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # abar_t = prod_{s<=t} (1 - beta_s)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])  # abar_{t-1}, abar_{-1} = 1
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # q(x_{t-1} | x_t, x_0) = N(c1 x0 + c2 x_t, beta_t (1 - abar_{t-1}) / (1 - abar_t))
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar)
        # The variance at t = 0 is 0: its log is clipped to the value at t = 1 (to beta_0 when T = 1).
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.cat([first, self.posterior_variance[1:]]).log()
        # FIXED_LARGE: variance beta_t, with the posterior variance at t = 0 (ADM).
        self.fixed_large_variance = torch.cat([first, betas[1:]])
        self._device_cache = {}

    @classmethod
    def dit(cls, num_timesteps: int = 1000, learn_sigma: bool = True) -> "GaussianDiffusion":
        """DiT's diffusion: linear betas 1e-4..0.02 over num_timesteps steps."""
        if int(num_timesteps) < 1:
            raise MPDiTError(f"num_timesteps must be >= 1, got {num_timesteps}")
        return cls(linear_betas(int(num_timesteps)), learn_sigma=learn_sigma)

    def __repr__(self):
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, learn_sigma={self.learn_sigma}, respaced={self.timestep_map is not None})"

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original-scale timesteps the model sees: timestep_map[t] (respaced) or t; (N,) long."""
        return t if self.timestep_map is None else self._table("timestep_map", t.device)[t]

    def _table(self, name: str, device) -> torch.Tensor:
        """The (T,) schedule array `name` on `device` (cached; float32 where float64 is missing)."""
        key = (name, torch.device(device))
        if key not in self._device_cache:
            arr = getattr(self, name)
            if arr.is_floating_point() and key[1].type == "mps":
                arr = arr.float()
            self._device_cache[key] = arr.to(key[1])
        return self._device_cache[key]

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] for each sample, shaped (N, 1, ..., 1) to broadcast against x, in x's dtype (>= float32)."""
        vals = self._table(name, x.device)[t.to(x.device)]
        return vals.to(torch.promote_types(x.dtype, torch.float32)).view(-1, *([1] * (x.ndim - 1)))

    # ------------------------------------------------------------------------
    # Forward process.

    def q_mean_variance(self, x0, t):
        """Moments of q(x_t | x_0): (mean, variance, log_variance), each broadcastable to x0's shape."""
        # q(x_t | x_0) = N(sqrt(abar) x0, (1 - abar) I)
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        var = 1.0 - self._extract("alphas_cumprod", t, x0)
        return mean, var, var.log()

    def q_sample(self, x0, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar) x0 + sqrt(1 - abar) noise; x0, noise (N, C, H, W)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self._extract("sqrt_alphas_cumprod", t, x0) * x0 + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Moments of q(x_{t-1} | x_t, x_0): (mean (N, C, H, W), variance, log_variance_clipped) (N, 1, 1, 1)."""
        # mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._extract("posterior_variance", t, x_t), self._extract("posterior_log_variance_clipped", t, x_t)

    # ------------------------------------------------------------------------
    # Reverse process.

    def pred_x0_from_eps(self, x_t, t, eps):
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def eps_from_pred_x0(self, x_t, t, pred_x0):
        """eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_x0) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    def split_output(self, model_output, x_t):
        """Split the model output into (eps, v): (N, 2C, H, W) -> two (N, C, H, W) (v is None without learn_sigma)."""
        C = x_t.shape[1]
        want = 2 * C if self.learn_sigma else C
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != want or model_output.shape[2:] != x_t.shape[2:]:
            raise MPDiTError(
                f"model output has shape {tuple(model_output.shape)}, expected {(x_t.shape[0], want, *x_t.shape[2:])}"
                f" ({'eps and variance channels: set learn_sigma' if self.learn_sigma else 'eps only: unset learn_sigma'} to match the model)"
            )
        model_output = model_output.to(torch.promote_types(model_output.dtype, torch.float32))
        return (model_output[:, :C], model_output[:, C:]) if self.learn_sigma else (model_output, None)

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False) -> dict:
        """Moments of p(x_{t-1} | x_t) from the model output (N, C or 2C, H, W).

        Returns dict: mean (N, C, H, W), variance and log_variance (broadcastable), pred_x0, eps (N, C, H, W).
        """
        eps, v = self.split_output(model_output, x_t)
        if self.learn_sigma:
            # log var = frac log(beta_t) + (1 - frac) log(posterior var clipped), frac = (v + 1) / 2
            min_log, max_log = self._extract("posterior_log_variance_clipped", t, x_t), self._extract("betas", t, x_t).log()
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = log_variance.exp()
        else:
            variance = self._extract("fixed_large_variance", t, x_t)
            log_variance = variance.log()
        pred_x0 = self.pred_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)  # mu_theta = posterior mean at pred_x0
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, eps=eps)

    # ------------------------------------------------------------------------
    # Training loss.

    def vb_terms_bpd(self, model_output, x0, x_t, t, clip_denoised: bool = False):
        """Variational-bound term per sample, bits per dimension, (N,):
        KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, decoder NLL -log p(x0 | x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t.to(x0.device) == 0, nll, kl)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023), (N,):
        min(SNR_t, gamma) / SNR_t with SNR_t = abar_t / (1 - abar_t); 1 wherever SNR_t <= gamma."""
        abar = self.alphas_cumprod[t.cpu()]
        return (gamma * (1.0 - abar) / abar).clamp(max=1.0).to(torch.float32).to(t.device)

    def training_losses(self, model_fn, x0, t, noise=None, min_snr_gamma: float = 0.0) -> dict:
        """DiT's loss for x0 (N, C, H, W) at steps t (N,): dict of per-sample (N,) tensors
        mse = mean ||eps - eps_theta||^2, vb = VB term with the mean detached (0 without learn_sigma),
        loss = mse + vb (unscaled, as ADM's LossType.MSE with learned sigma). ``min_snr_gamma`` > 0
        weights the mse term by :meth:`min_snr_weights` in ``loss`` (off, as in DiT, by default).

        model_fn(x_t, t_model) -> (N, 2C or C, H, W) is called with original-scale timesteps.
        """
        if t.shape != (x0.shape[0],):
            raise MPDiTError(f"t must have shape ({x0.shape[0]},), one step per sample, got {tuple(t.shape)}")
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t))
        eps, v = self.split_output(model_output, x_t)
        mse = mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            # The VB term trains only the variance: stop-gradient on the eps half.
            vb = self.vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x0, x_t, t)
        else:
            vb = torch.zeros_like(mse)
        weight = self.min_snr_weights(t, min_snr_gamma) if min_snr_gamma > 0 else 1.0
        return dict(loss=weight * mse + vb, mse=mse, vb=vb)


# ----------------------------------------------------------------------------
# Respacing.


def space_timesteps(num_timesteps: int, steps: int | str) -> list[int]:
    """ADM's choice of kept steps (sorted list) out of num_timesteps.

    steps: an int n (n evenly spaced steps from 0 to T-1, rounded), "n1,n2,..." (T split into equal
    sections, n_i steps spread evenly over section i), or "ddimN" (range(0, T, stride) with exactly N steps).
    """
    T = int(num_timesteps)
    if isinstance(steps, str):
        s = steps.strip()
        if s.startswith("ddim"):
            try:
                want = int(s[len("ddim"):])
            except ValueError:
                raise MPDiTError(f"bad step spec {steps!r}: use an integer, 'n1,n2,...' or 'ddimN'") from None
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == want:
                    return list(range(0, T, stride))
            raise MPDiTError(f"cannot take exactly {want} DDIM steps with an integer stride from {T}: pick another count")
        try:
            counts = [int(c) for c in s.split(",")]
        except ValueError:
            raise MPDiTError(f"bad step spec {steps!r}: use an integer, 'n1,n2,...' or 'ddimN'") from None
    else:
        counts = [int(steps)]
    if len(counts) > T or any(c <= 0 for c in counts) or sum(counts) > T:
        raise MPDiTError(f"sampling steps must be between 1 and {T} (per section at most its size), got {steps!r}")
    size_per, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise MPDiTError(f"cannot take {count} steps from a section of {size} steps: lower the count")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respace(diffusion_or_num_timesteps: "GaussianDiffusion | int", steps: int | str, *, learn_sigma: bool = True) -> GaussianDiffusion:
    """A diffusion over a subset of the steps of `diffusion_or_num_timesteps` (an int T builds DiT's
    diffusion with T steps and learn_sigma). The kept steps' abar are unchanged:
    beta_i = 1 - abar_i / abar_{previous kept}; timestep_map = the kept original steps."""
    base = diffusion_or_num_timesteps
    if not isinstance(base, GaussianDiffusion):
        base = GaussianDiffusion.dit(int(base), learn_sigma=learn_sigma)
    kept = torch.tensor(space_timesteps(base.num_timesteps, steps), dtype=torch.long)
    abar = base.alphas_cumprod[kept]
    betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])  # beta_i = 1 - abar_i / abar_{prev kept}
    original = kept if base.timestep_map is None else base.timestep_map[kept]  # respacing a respaced diffusion composes
    return GaussianDiffusion(betas, learn_sigma=base.learn_sigma, timestep_map=original)
