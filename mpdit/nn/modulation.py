"""Conditioning by modulation (DESIGN.md section 2): scale, shift, rotation and gate.

Each operation takes a per-sample vector produced from the condition by a zero-init
projection, so every operation starts as the identity. Per-sample vectors have shape
(N, 1, width) and broadcast over the tokens of x (N, T, D).
"""

import torch
from torch import nn

from mpdit.errors import MPDiTError
from mpdit.nn.primitives import MPLinear

# Named conditioning variants: the operations whose projections a block owns, in chunk order.
# adaln-zero keeps DiT's chunk order (shift, scale, gate) so official checkpoints map 1:1.
CONDITIONINGS: dict[str, tuple[str, ...]] = {
    "adaln-zero": ("shift", "scale", "gate"),
    "scale-shift-gate": ("scale", "shift", "gate"),
    "rotation": ("rotation",),
    "rotation-gate": ("rotation", "gate"),
    "scale-rotation-gate": ("scale", "rotation", "gate"),
    "scale-gate": ("scale", "gate"),
    "shift-gate": ("shift", "gate"),
}


def conditioning_ops(name: str) -> tuple[str, ...]:
    """The operations of a named conditioning variant; MPDiTError for an unknown name."""
    if name not in CONDITIONINGS:
        raise MPDiTError(f"unknown conditioning '{name}': choose one of {', '.join(CONDITIONINGS)}")
    return CONDITIONINGS[name]


def scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x * (1 + s)."""
    return x * (1 + s)


def shift(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x + b."""
    return x + b


def rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) by theta: x (..., D), theta (..., D/2) broadcastable.

    out1 = x1 cos(theta) - x2 sin(theta), out2 = x1 sin(theta) + x2 cos(theta); each token's norm is kept.
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = theta.cos(), theta.sin()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def modulation_coefficients(vectors: dict[str, torch.Tensor], suffix: str = "",
                            input_scale: torch.Tensor | None = None) -> tuple:
    """Per-sample coefficients of the present ones of scale, shift, rotation (keys `op + suffix`), in this order.

    Vectors (..., width) with any leading axes, so the coefficients of every block come from one call.
    Returns ("affine", a, b): x * a + b, either may be None; or ("rotation", M, r) for a rotation after
    scale and shift: channel pair (x1, x2) -> M (x1, x2) + r with the 2x2 matrices M = R(theta) diag(a1, a2),
    stored (..., 2, 2, D/2) as [[a1 cos, -a2 sin], [a1 sin, a2 cos]], and r = rotate(b, theta) (or None).
    input_scale (broadcastable, last axis 1): the coefficients of modulating input_scale * x, the factor folded
    into the multiplier (a, or M) in input_scale's own precision (float32), the product then cast to the vectors'
    dtype: under bf16 autocast a constant rounded once would scale every sample alike (by up to 0.4%, a bias
    that the learned gains then chase), where a product rounded per element errs both ways.
    """
    s, b, theta = (vectors.get(op + suffix) for op in ("scale", "shift", "rotation"))
    dtype = next((v.dtype for v in (s, b, theta) if v is not None), None)

    def in_dtype(coefficient: torch.Tensor | None) -> torch.Tensor | None:
        return coefficient if coefficient is None or dtype is None else coefficient.to(dtype)

    if s is None:
        a = input_scale
    else:
        a = 1 + s if input_scale is None else torch.addcmul(input_scale, s, input_scale)  # (1 + s) input_scale
    if theta is None:
        return "affine", in_dtype(a), b
    cos, sin = theta.cos(), theta.sin()
    m = torch.stack([cos, -sin, sin, cos], dim=-2)  # (..., 4, D/2)
    if s is not None:
        a1, a2 = a.chunk(2, dim=-1)
        m = m * torch.stack([a1, a2, a1, a2], dim=-2)
    elif input_scale is not None:
        m = m * input_scale.unsqueeze(-1)
    return "rotation", in_dtype(m.unflatten(-2, (2, 2))), None if b is None else rotate(b, theta)


def apply_modulation(x: torch.Tensor, coefficients: tuple) -> torch.Tensor:
    """x (N, T, D) modulated by per-sample coefficients from modulation_coefficients ((N, 1, ...) each).

    Scale and shift are one multiply-add; a rotation is the channel pairs times their 2x2 matrices (PairMix):
    one multiply and one multiply-add, no copies of the channel halves.
    """
    kind, p, q = coefficients
    if kind == "affine":
        if p is None:
            return x if q is None else x + q
        return x * p if q is None else torch.addcmul(q, x, p)
    out = PairMix.apply(x, p)
    return out if q is None else out + q


class PairMix(torch.autograd.Function):
    """Channel pairs (x_1, x_2) = (x_i, x_(i + D/2)) of x (N, T, D) times per-sample 2x2 matrices M (N, 1, 2, 2, D/2):
    out_k = M_k1 x_1 + M_k2 x_2, both halves of the output at once as one multiply and one multiply-add, each
    half of x broadcast over k. Backward: dL/dx_j = sum_k M_kj G_k the same way, dL/dM_kj = sum_t G_k x_j.
    Where autograd through a broadcast product and a sum over the pair writes (N, T, 2, 2, D/2) products in the
    forward and twice in the backward, this moves 4/5 of the bytes and runs ~4x faster on a CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, m)
        return PairMix.mix(x, m[:, :, :, 0], m[:, :, :, 1])  # columns j = 1, 2 of M: (N, 1, 2, D/2) each

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, m = ctx.saved_tensors
        grad_x = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = PairMix.mix(grad, m[:, :, 0], m[:, :, 1])  # rows k = 1, 2 of M: the transpose's columns
        if ctx.needs_input_grad[1]:
            n, t, d = x.shape
            grad_m = (grad.view(n, t, 2, 1, d // 2) * x.view(n, t, 1, 2, d // 2)).sum_to_size(m.shape)
        return grad_x, grad_m

    @staticmethod
    def mix(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """x_1 * first + x_2 * second, x (N, T, D) in halves x_1, x_2 broadcast against (N, 1, 2, D/2): (N, T, D)."""
        n, t, d = x.shape
        halves = x.view(n, t, 2, d // 2)
        return torch.addcmul(halves[:, :, :1] * first, halves[:, :, 1:], second).view(n, t, d)


def modulate(x: torch.Tensor, vectors: dict[str, torch.Tensor], suffix: str = "") -> torch.Tensor:
    """Apply, in this order, the present ones of scale, shift, rotation (keys `op + suffix`) to x (N, T, D)."""
    return apply_modulation(x, modulation_coefficients(vectors, suffix))


class ConditionProjection(nn.Module):
    """Zero-init projections of the (activated) condition c (N, C) to named per-sample vectors (N, 1, width).

    A rotation's vector has width D/2, any other D. All projections run as one matmul; with
    weight normalization each keeps its own learned scalar gain (starting at 0), which is exactly
    a set of separate zero-init MPLinear layers: per projection D*C + 1 parameters (a rotation D*C/2 + 1).
    Without weight normalization it is one zero-init nn.Linear with bias, as DiT's adaLN projection (or, with
    zero_init off, xavier-initialised as DiT's other linears).
    """

    def __init__(self, cond_dim: int, dim: int, names: list[str], *, weight_norm: bool, forced: bool,
                 zero_init: bool = True):
        super().__init__()
        self.names = list(names)
        self.widths = [dim // 2 if name.startswith("rotation") else dim for name in self.names]
        out = sum(self.widths)
        if weight_norm:
            self.proj = MPLinear(cond_dim, out, traditional=True, forced=forced, learned_gain=0.0,
                                 gain_rows=self.widths)
        else:
            self.proj = nn.Linear(cond_dim, out)
            nn.init.zeros_(self.proj.bias)
            if zero_init:
                nn.init.zeros_(self.proj.weight)
            else:  # DyT's DiT recipe: DiT's basic init (xavier-uniform weight, zero bias) instead of zeros
                nn.init.xavier_uniform_(self.proj.weight)

    def forward(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.proj(c)  # (N, sum of widths)
        return dict(zip(self.names, out.unsqueeze(1).split(self.widths, dim=-1)))


class RotationModulation(nn.Module):
    """Drop-in rotation modulation: rotates channel pairs of x (N, T, D) by angles computed from c (N, C).

    The angles come from a zero-init projection, so the module starts as the identity. It preserves
    each token's norm exactly and costs D*C/2 (+1 gain) parameters, half of a scale or shift.
    """

    def __init__(self, dim: int, cond_dim: int, *, weight_norm: bool = True):
        super().__init__()
        if dim % 2:
            raise MPDiTError(f"rotation modulation needs an even width, got {dim}")
        self.angles = ConditionProjection(cond_dim, dim, ["rotation"], weight_norm=weight_norm, forced=weight_norm)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return modulate(x, self.angles(c))
