"""Magnitude-preserving primitives (DESIGN.md section 1; EDM2, Karras et al. 2024).

Magnitude M[x] = sqrt(mean(x^2)) over the feature axis. Each primitive keeps M about 1
for unit-magnitude input, with no normalization layer on the activations.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-4


def normalize(x: torch.Tensor, dim=None, eps: float = EPS) -> torch.Tensor:
    """x / (eps + ||x||_2 / sqrt(n)) over `dim` (default: all but the first), so each slice has RMS 1."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))  # eps + ||x|| / sqrt(n)
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """silu(x) / 0.596: unit magnitude for unit-variance Gaussian input (EDM2 eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): magnitude-preserving blend (EDM2 eq. 88)."""
    return a.lerp(b.to(a.dtype), t) / math.sqrt((1 - t) ** 2 + t**2)


class MPSiLU(nn.Module):
    """Module form of mp_silu, so it can stand where DiT has nn.SiLU / nn.GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mp_silu(x)


class WeightNormLinear(torch.autograd.Function):
    """y = x W^T with W = c w / n, n = eps + ||w_row|| / sqrt(fan_in) (normalize, per row), c = scale * gain.

    The backward uses the closed-form gradient of the normalization,
    dL/dw = (c / n) (G - w (G . w)_row / (n ||w_row|| sqrt(fan_in))), dL/dgain = scale sum_rows (G . w)_row / n,
    with G = dL/dW, and recomputes W from w instead of saving it: no weight-sized tensor is kept for backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor | None, scale: float) -> torch.Tensor:
        fan_in = weight.shape[1]
        rms = torch.linalg.vector_norm(weight, dim=1, keepdim=True) / math.sqrt(fan_in)  # (out, 1)
        norm = rms + EPS
        coef = scale / norm if gain is None else (scale * gain) / norm
        ctx.save_for_backward(x, weight, rms, gain)
        ctx.scale = scale
        return F.linear(x, (weight * coef).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rms, gain = ctx.saved_tensors
        fan_in = weight.shape[1]
        norm = rms + EPS
        coef = ctx.scale / norm if gain is None else (ctx.scale * gain) / norm
        grad_x = grad_out @ (weight * coef).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_w_eff = (grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype))
        grad_w_eff = grad_w_eff.to(weight.dtype)  # G: (out, in)
        dot = (grad_w_eff * weight).sum(dim=1, keepdim=True)  # (G . w) per row
        grad_weight = coef * (grad_w_eff - weight * (dot / (norm * rms.clamp_min(1e-30) * fan_in)))
        grad_gain = (ctx.scale * dot / norm).sum().reshape(gain.shape) if gain is not None else None
        return grad_x, grad_weight, grad_gain, None


class MPLinear(nn.Module):
    """Linear map, or patchify convolution (kernel = stride = patch_size), with EDM2 weight normalization.

    traditional: the forward uses normalize(w) * gain / sqrt(fan_in)   (EDM2 eq. 66, gradients orthogonal to w)
    forced:      in training, before use, w <- normalize(w)             (EDM2 eq. 67, stops weight growth)
    Without `traditional` the stored weight is used as is (rows of norm 1 when forced), with an optional bias.
    learned_gain: None for a fixed gain of 1, else the initial value of a learned scalar gain
    (0 gives EDM2's zero-init layer: output 0 at init, weights still random).
    input_gain: a constant the input is multiplied by, folded into the weight (e.g. mp_silu's 1 / 0.596).
    In eval mode under no_grad the effective weight is computed once and reused until a parameter changes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        patch_size: int | None = None,
        traditional: bool = True,
        forced: bool = True,
        learned_gain: float | None = None,
        bias: bool = False,
        input_gain: float = 1.0,
    ):
        super().__init__()
        kernel = () if patch_size is None else (patch_size, patch_size)
        self.patch_size, self.traditional, self.forced, self.input_gain = patch_size, traditional, forced, input_gain
        self.fan_in = in_features * math.prod(kernel)
        weight = torch.randn(out_features, in_features, *kernel)
        self.weight = nn.Parameter(weight if traditional else normalize(weight) / math.sqrt(self.fan_in))
        self.gain = None if learned_gain is None else nn.Parameter(torch.tensor(float(learned_gain)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._cache = None

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the forward multiplies by: (out, in) or (out, in, p, p)."""
        if self.traditional:
            w = normalize(self.weight) * (self.input_gain / math.sqrt(self.fan_in))
        else:
            w = self.weight if self.input_gain == 1 else self.weight * self.input_gain
        if self.gain is not None:
            w = w * self.gain
        return w.to(dtype)

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The eval-mode effective weight, recomputed when a parameter is written in place (its version counter)
        or replaced (a new tensor or storage: load_state_dict(assign=True), param.data = ..., functional_call)."""
        key = (dtype, self.weight.device, *((id(t), t.data_ptr(), t._version) for t in (self.weight, self.gain)
                                            if t is not None))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.effective_weight(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.forced:
            with torch.no_grad():  # forced weight normalization
                scale = 1.0 if self.traditional else 1.0 / math.sqrt(self.fan_in)
                self.weight.copy_(normalize(self.weight) * scale)
        if not (self.training or torch.is_grad_enabled()):
            w = self._cached_weight(x.dtype)
        elif self.traditional and self.patch_size is None and torch.is_grad_enabled():
            self._cache = None
            return WeightNormLinear.apply(x, self.weight, self.gain, self.input_gain / math.sqrt(self.fan_in))
        else:
            self._cache = None
            w = self.effective_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.patch_size is None:
            return F.linear(x, w, bias)
        return F.conv2d(x, w, bias, stride=self.patch_size)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape[:2]
        return (f"{inp}, {out}, patch_size={self.patch_size}, traditional={self.traditional}, "
                f"forced={self.forced}, learned_gain={self.gain is not None}, bias={self.bias is not None}")


class MPEmbedding(nn.Module):
    """Embedding table whose rows are forced- and traditionally weight-normalized to RMS 1."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))  # forced weight normalization
        return F.embedding(index, normalize(self.weight))  # (N,) -> (N, D), rows of RMS 1


class MPFourier(nn.Module):
    """EDM2's MPFourier: sqrt(2) cos(2 pi (f c + phi)) with fixed f ~ N(0, 1), phi ~ U(0, 1); (N,) -> (N, C)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        y = c.float().outer(self.freqs.float()) + self.phases.float()
        return (y.cos() * np.sqrt(2)).to(c.dtype if c.is_floating_point() else torch.float32)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """DiT's fixed 2-D sin-cos position table, (grid_size^2, dim), tokens row-major (h, w).

    Half the channels encode the row, half the column, each as [sin | cos] of
    positions times 1 / 10000^(2i / (dim / 2)), as in MAE / DiT.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    grid = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(grid, grid)  # DiT passes (w, h) order: first half of channels from w

    def encode(pos):
        out = pos.reshape(-1, 1) * omega[None]  # (T, dim/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (T, dim/2)

    table = np.concatenate([encode(grid_w), encode(grid_h)], axis=1)  # (T, dim)
    return torch.from_numpy(table).float()


def mp_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """The sin-cos table with each channel's mean over positions removed, then scaled to RMS 1 overall."""
    table = sincos_pos_embed_2d(dim, grid_size)
    table = table - table.mean(dim=0, keepdim=True)
    return table / table.pow(2).mean().sqrt()


def timestep_sinusoidal(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's timestep features: [cos | sin] of t / max_period^(i / half); (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
