"""Dynamic Tanh (Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", CVPR 2025)."""

import torch
from torch import nn

# DyT's default initial alpha (their paper, section 4, for non-LLM models).
DYT_ALPHA_INIT = 0.5


class DynamicTanh(nn.Module):
    """DyT(x) = tanh(alpha x), one learned scalar alpha: the drop-in for a LayerNorm without affine (DiT's), so
    DyT's own gamma and beta, which stand for the affine, are left out."""

    def __init__(self, alpha_init: float = DYT_ALPHA_INIT):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x)  # (N, T, D), elementwise
