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


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [x2 | x1] over the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, x1], dim=-1)


def modulate(x: torch.Tensor, vectors: dict[str, torch.Tensor], suffix: str = "") -> torch.Tensor:
    """Apply, in this order, the present ones of scale, shift, rotation (keys `op + suffix`).

    Computed as one affine map with per-sample coefficients, so x (N, T, D) is read at most twice:
    rotate(x * a + b, theta) = x * (a C) + swap(x) * (swap(a) S) + rotate(b, theta),
    with C = [cos | cos], S = [-sin | sin] (the rotation written as y C + swap(y) S).
    """
    s, b, theta = (vectors.get(op + suffix) for op in ("scale", "shift", "rotation"))
    a = None if s is None else 1 + s
    if theta is None:
        if a is None:
            return x if b is None else x + b
        return x * a if b is None else torch.addcmul(b, x, a)
    cos, sin = theta.cos(), theta.sin()
    x_coef, swap_coef = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (N, 1, D)
    if a is not None:
        x_coef, swap_coef = a * x_coef, swap_halves(a) * swap_coef
    out = x * x_coef if b is None else torch.addcmul(rotate(b, theta), x, x_coef)
    return torch.addcmul(out, swap_halves(x), swap_coef)


class ConditionProjection(nn.Module):
    """Zero-init projections of the (activated) condition c (N, C) to named per-sample vectors (N, 1, width).

    A rotation's vector has width D/2, any other D. All projections run as one matmul; with
    weight normalization each keeps its own learned scalar gain (starting at 0), which is exactly
    a set of separate zero-init MPLinear layers: per projection D*C + 1 parameters (a rotation D*C/2 + 1).
    Without weight normalization it is one zero-init nn.Linear with bias, as DiT's adaLN projection.
    """

    def __init__(self, cond_dim: int, dim: int, names: list[str], *, weight_norm: bool, forced: bool):
        super().__init__()
        self.names = list(names)
        self.widths = [dim // 2 if name.startswith("rotation") else dim for name in self.names]
        out = sum(self.widths)
        if weight_norm:
            self.proj = MPLinear(cond_dim, out, traditional=True, forced=forced)
            self.gains = nn.Parameter(torch.zeros(len(self.names)))
        else:
            self.proj = nn.Linear(cond_dim, out)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
            self.gains = None
        gain_index = [i for i, width in enumerate(self.widths) for _ in range(width)]  # output row -> projection
        self.register_buffer("_gain_index", torch.tensor(gain_index), persistent=False)

    def forward(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.proj(c)  # (N, sum of widths)
        if self.gains is not None:
            out = out * self.gains[self._gain_index].to(out.dtype)
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
        return rotate(x, self.angles(c)["rotation"])
