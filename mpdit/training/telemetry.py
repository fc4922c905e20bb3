"""Magnitude telemetry: per-block activation and weight magnitudes, the quantities the paper is about."""

import contextlib

import torch

from mpdit.model.dit import MPDiT


def rms(x: torch.Tensor) -> float:
    """Magnitude M[x] = sqrt(mean(x^2)) over all elements."""
    return float(x.detach().float().pow(2).mean().sqrt())


class Telemetry:
    """Records, during one forward pass, the RMS of the token stream after the embedding and after each block;
    `report()` adds the RMS of each block's weight matrices (stored weights, as the optimizer sees them)."""

    def __init__(self, model: MPDiT):
        self.model = model
        self.activations: list[float] = []

    @contextlib.contextmanager
    def recording(self, enabled: bool = True):
        if not enabled:
            yield
            return
        self.activations = []

        def record(block, _inputs, output):  # the stream as MPDiT carries it, times its scale (residual_scales)
            self.activations.append(rms(output) * self.model.block_output_scales[len(self.activations)])

        handles = [block.register_forward_hook(record) for block in self.model.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def report(self) -> dict:
        """{"act_rms": [per block], "weight_rms": [per block], "gain_abs": [per block, mean |gain|]}."""
        weights, gains = [], []
        for block in self.model.blocks:
            matrices = [p for name, p in block.named_parameters() if p.ndim >= 2]
            weights.append(rms(torch.cat([p.detach().flatten() for p in matrices])))
            scalars = [p.detach().abs().flatten() for name, p in block.named_parameters() if "gain" in name]
            gains.append(float(torch.cat(scalars).mean()) if scalars else None)
        return {"act_rms": [round(a, 5) for a in self.activations], "weight_rms": [round(w, 5) for w in weights],
                "gain_abs": [None if g is None else round(g, 5) for g in gains]}
