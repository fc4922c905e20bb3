"""Magnitude-preserving primitives (DESIGN.md section 1; EDM2, Karras et al. 2024).

Magnitude M[x] = sqrt(mean(x^2)) over the feature axis. Each primitive keeps M about 1
for unit-magnitude input, with no normalization layer on the activations.
"""

import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-4


def normalize(x: torch.Tensor, dim=None, eps: float = EPS) -> torch.Tensor:
    """x / (eps + ||x||_2 / sqrt(n)) over `dim` (default: all but the first), so each slice has RMS 1."""
    return Normalize.apply(x, list(range(1, x.ndim)) if dim is None else dim, eps)


class Normalize(torch.autograd.Function):
    """y = x / d, d = eps + a ||x|| (a = 1 / sqrt(n)), with the closed-form backward
    dL/dx = (G - a y (G . y) d / ||x||) / d: a few kernels where autograd through the norm and the division
    takes about twice as many."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
        alpha = math.sqrt(norm.numel() / x.numel())
        denom = torch.add(eps, norm, alpha=alpha)  # eps + ||x|| / sqrt(n)
        denom_x = denom.to(x.dtype)  # kept for the backward too: one cast fewer there under autocast
        y = x / denom_x
        ctx.save_for_backward(y, denom, norm, denom_x)
        ctx.dim, ctx.alpha = dim, alpha
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, denom, norm, denom_x = ctx.saved_tensors
        dot = (grad * y).sum(dim=ctx.dim, keepdim=True, dtype=torch.float32)  # G . y per slice
        coef = (dot * denom / norm.clamp_min(1e-30)).to(grad.dtype)
        return torch.addcmul(grad, y, coef, value=-ctx.alpha) / denom_x.to(grad.dtype), None, None


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


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul runs in: autocast's where it is on for the device, else `dtype`."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


class GroupedWeightNorm(torch.autograd.Function):
    """Traditional weight normalization (EDM2 eq. 66) of several weights with one fan-in, rows stacked (R, F).

    W = w c / n per row, n = eps + ||w_row|| / sqrt(F), c = row_scale (R, 1). One pass for all the weights,
    forward and backward; the backward is closed-form and restacks w instead of saving the stack:
    dL/dw = (c / n) (G - w (G . w)_row / (n ||w_row|| sqrt(F))), dL/dc = (G . w)_row / n, with G = dL/dW.
    `stacked` (a scratch copy of the weights stacked) and `rms` (R, 1), the rows' RMS: forced normalization's
    ForcedRows when it just ran, else None (computed here).
    """

    @staticmethod
    def forward(ctx, row_scale: torch.Tensor, dtype: torch.dtype, stacked: torch.Tensor | None,
                rms: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        w = stack_rows(weights) if stacked is None else stacked  # (R, F)
        if rms is None:
            rms = torch.linalg.vector_norm(w, dim=1, keepdim=True) / math.sqrt(w.shape[1])  # (R, 1)
        ctx.save_for_backward(row_scale, rms, *weights)
        coef = row_scale / (rms + EPS)
        if dtype == w.dtype:
            scratch = stacked is not None or len(weights) > 1  # else w is a view of the weight
            return w.mul_(coef) if scratch else w * coef
        return torch.mul(w, coef, out=torch.empty(w.shape, dtype=dtype, device=w.device))  # cast as it is written

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        row_scale, rms, *weights = ctx.saved_tensors
        w = stack_rows(weights)
        norm = rms + EPS
        if grad.dtype == w.dtype:  # (G . w) per row as R dot products: reads G and w, writes no product
            dot = torch.bmm(grad.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)
        else:  # a bf16 G read as it is, the product in w's dtype (a cast of G would cost as much as the product)
            dot = (grad * w).sum(dim=1, keepdim=True)
        grad_w = torch.addcmul(grad, w, dot / (norm * rms.clamp_min(1e-30) * w.shape[1]), value=-1)
        grad_w.mul_(row_scale / norm)  # in place: few weight-sized temporaries
        grad_scale = dot / norm if ctx.needs_input_grad[0] else None
        rows = grad_w.split([v.shape[0] for v in weights])
        return (grad_scale, None, None, None, *(g.view_as(v) for g, v in zip(rows, weights)))


def stack_rows(weights) -> torch.Tensor:
    """Weights (out_i, ...) with one fan-in, as one (sum of out_i, fan_in) matrix (a view for a single weight)."""
    return weights[0].flatten(1) if len(weights) == 1 else torch.cat([w.flatten(1) for w in weights])


class ForcedRows(NamedTuple):
    """What forced normalization leaves for the traditional one after it: the new weights stacked (R, F), a scratch
    copy (None for a single weight, stacked as a view of itself), and the RMS of each new row (R, 1)."""

    stacked: torch.Tensor | None
    rms: torch.Tensor


@torch.no_grad()
def force_normalize_(weights, scale: float) -> ForcedRows:
    """Forced weight normalization (EDM2 eq. 67) of several weights with one fan-in, in place: w <- normalize(w) * scale,
    each row times f = scale / (eps + r), r = ||w_row|| / sqrt(F). The new rows' RMS is scale r / (eps + r) =
    scale - eps f, so the traditional normalization that follows need not read the weights again for it."""
    stacked = stack_rows(weights)  # (R, F): a scratch copy, or a view of the single weight
    norm = torch.linalg.vector_norm(stacked, dim=1, keepdim=True, dtype=torch.float32)
    factor = scale / torch.add(EPS, norm, alpha=1 / math.sqrt(stacked.shape[1]))  # (R, 1)
    rms = torch.add(scale, factor, alpha=-EPS)
    single, compiling = len(weights) == 1, torch.compiler.is_compiling()
    if single and not compiling:
        weights[0].mul_(factor.view(-1, *[1] * (weights[0].ndim - 1)))
        return ForcedRows(None, rms)
    # compiled (torch 2.13), a product in place on a parameter, or a foreach copy into one, is lost: copies fuse
    stacked = stacked * factor if single else stacked.mul_(factor)
    rows = [r.view_as(w) for r, w in zip(stacked.split([w.shape[0] for w in weights]), weights)]
    if compiling:
        for w, r in zip(weights, rows):
            w.copy_(r)
    else:
        torch._foreach_copy_(list(weights), rows)  # one kernel
    return ForcedRows(None if single else stacked, rms)


class WeightNormalized(nn.Module):
    """A weight whose rows are normalized (EDM2 sec. 2.3): the base of MPLinear and MPEmbedding.

    traditional: the forward uses normalize(w) * row_scale      (EDM2 eq. 66, gradients orthogonal to w)
    forced:      in training, before use, w <- normalize(w)      (EDM2 eq. 67, stops weight growth)
    row_scale = scale * gain: `scale` a constant, gain a learned scalar, or one learned scalar per block of
    rows (gain_rows). A model computes the normalized weights of all its layers together (WeightNormBank)
    and hands each layer its own in `current_weight`; a layer used alone computes its own.
    """

    def init_weight(self, weight: torch.Tensor, *, traditional: bool, forced: bool, scale: float,
                    learned_gain: float | None = None, gain_rows: list[int] | None = None) -> None:
        self.traditional, self.forced, self.scale = traditional, forced, scale
        self.fan_in = weight[0].numel()
        self.forced_scale = 1.0 if traditional else 1.0 / math.sqrt(self.fan_in)  # stored rows: RMS 1, or norm 1
        self.weight = nn.Parameter(weight if traditional else normalize(weight) * self.forced_scale)
        self.gain = None
        if learned_gain is not None:
            shape = () if gain_rows is None else (len(gain_rows),)
            self.gain = nn.Parameter(torch.full(shape, float(learned_gain)))
        rows = gain_rows or [weight.shape[0]]
        row_to_gain = torch.arange(len(rows)).repeat_interleave(torch.tensor(rows), output_size=sum(rows))
        self.register_buffer("gain_index", row_to_gain, persistent=False)  # (out,): row -> entry of gain
        self.current_weight = None

    def row_gain(self) -> torch.Tensor | None:
        """The learned gain of each row, (out,), or None without a learned gain."""
        if self.gain is None:
            return None
        if self.gain.ndim == 0:  # one gain: a broadcast view (indexing's scatter backward trips inductor's CPU codegen)
            return self.gain.expand(len(self.gain_index))
        return self.gain[self.gain_index]

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this layer's forward multiplies by: the one its model's WeightNormBank prepared for this
        forward, or, for a layer used alone, forced normalization (in training) and then normalized_weight."""
        if self.current_weight is not None:
            return self.current_weight
        forced = force_normalize_([self.weight], self.forced_scale) if self.training and self.forced else None
        return self.normalized_weight(dtype, None if forced is None else forced.rms)

    def normalized_weight(self, dtype: torch.dtype, rms: torch.Tensor | None = None) -> torch.Tensor:
        """normalize(w) * row_scale (traditional), else w * row_scale, without forced normalization. rms (out, 1):
        the RMS of the weight's rows where forced normalization just gave it, else None."""
        gain = self.row_gain()
        if not self.traditional and gain is None and self.scale == 1:
            return self.weight.to(dtype)
        row_scale = torch.full((self.weight.shape[0], 1), self.scale, device=self.weight.device)
        if gain is not None:
            row_scale = row_scale * gain[:, None]
        if self.traditional:
            return GroupedWeightNorm.apply(row_scale, dtype, None, rms, self.weight).view_as(self.weight)
        return (self.weight * row_scale.view(-1, *[1] * (self.weight.ndim - 1))).to(dtype)


class MPLinear(WeightNormalized):
    """Linear map, or patchify convolution (kernel = stride = patch_size), with EDM2 weight normalization.

    Traditional: normalize(w) * gain / sqrt(fan_in); without it the stored weight is used as is (rows of
    norm 1 when forced), with an optional bias. learned_gain: None for a fixed gain of 1, else the initial
    value of a learned scalar gain (0 gives EDM2's zero-init layer: output 0 at init, weights still random);
    gain_rows: one learned gain per block of that many output rows. input_gain: a constant the input is
    multiplied by, folded into the weight (e.g. mp_silu's 1 / 0.596).
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
        gain_rows: list[int] | None = None,
        bias: bool = False,
        input_gain: float = 1.0,
    ):
        super().__init__()
        kernel = () if patch_size is None else (patch_size, patch_size)
        self.patch_size = patch_size
        fan_in = in_features * math.prod(kernel)
        self.init_weight(torch.randn(out_features, in_features, *kernel), traditional=traditional, forced=forced,
                         scale=input_gain / math.sqrt(fan_in) if traditional else input_gain,
                         learned_gain=learned_gain, gain_rows=gain_rows)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight(autocast_dtype(x.device, x.dtype))
        bias = None if self.bias is None else self.bias.to(w.dtype)
        if self.patch_size is None:
            return F.linear(x, w, bias)
        return F.conv2d(x, w, bias, stride=self.patch_size)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape[:2]
        return (f"{inp}, {out}, patch_size={self.patch_size}, traditional={self.traditional}, "
                f"forced={self.forced}, learned_gain={self.gain is not None}, bias={self.bias is not None}")


class MPEmbedding(WeightNormalized):
    """Embedding table whose rows are forced- and traditionally weight-normalized to RMS 1."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.init_weight(torch.randn(num_embeddings, dim), traditional=True, forced=True, scale=1.0)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.effective_weight(torch.float32))  # (N,) -> (N, D), rows of RMS 1


class WeightNormBank(nn.Module):
    """All weight-normalized layers of a model, grouped by fan-in, so that forced normalization and the
    normalized weights of a forward cost a few kernels per group instead of several per layer.

    prepare() (at the start of the model's forward): in training, forced normalization of every forced
    weight; then each layer's normalized weight, handed to it in `current_weight` (views of one tensor per
    group, in the autocast dtype). They are computed from the parameters at every forward, except inside
    reusing_weights() (a sampling loop), where eval-mode no-grad forwards compute them once. release() (at the end)
    drops the handed-out weights.
    `stack`: True stacks each group, False treats each layer alone (the same formulas; MPDiT.stacking says when).
    `spans`: lists of consecutive layers of one group that a stacked forward uses only together, as one matrix
    (span()); each is one piece of its group's split, so the backward gets no zero gradients for its layers'
    own pieces.
    """

    def __init__(self, layers: list[WeightNormalized], spans: tuple[list[WeightNormalized], ...] = ()):
        super().__init__()
        self.layers = tuple(layers)
        forced, traditional = {}, {}
        for layer in self.layers:
            if layer.forced:
                forced.setdefault((layer.fan_in, layer.forced_scale), []).append(layer)
            if layer.traditional:
                traditional.setdefault(layer.fan_in, []).append(layer)
        self.forced_groups = tuple((scale, tuple(group)) for (_, scale), group in forced.items())
        self.groups = tuple(tuple(group) for group in traditional.values())
        for i, group in enumerate(self.groups):  # per row: the constant scale, and where its learned gain is
            num_gains = sum(layer.gain.numel() for layer in group if layer.gain is not None)
            index, offset = [], 0  # into [all learned gains of the group, then a constant 1]
            for layer in group:
                if layer.gain is None:
                    index.append(torch.full((layer.weight.shape[0],), num_gains))
                else:
                    index.append(layer.gain_index + offset)
                    offset += layer.gain.numel()
            scale = torch.cat([torch.full((layer.weight.shape[0], 1), layer.scale) for layer in group])
            self.register_buffer(f"row_scale{i}", scale, persistent=False)
            self.register_buffer(f"gain_index{i}", torch.cat(index)[:, None], persistent=False)
        self.register_buffer("one", torch.ones(1), persistent=False)
        self.pieces = tuple(self.split_plan(group, spans) for group in self.groups)  # per group: layer runs
        self._cache, self.spans, self.reuse = None, {}, False

    @contextlib.contextmanager
    def reusing_weights(self):
        """Within: eval-mode, no-grad forwards compute the normalized weights once and reuse them, for as long as no
        parameter is replaced or written through autograd (its version). The caller promises that the weights do
        not change otherwise inside (a `.data` write is invisible to versions): a sampling loop. Outside, every
        forward computes them from the parameters as they are, so no way of changing the weights (`.data` writes,
        load_state_dict, an optimizer step, train()/eval()) can leave a stale copy; the copy is dropped on exit."""
        previous, self.reuse = self.reuse, True
        try:
            yield
        finally:
            self.reuse = previous
            if not previous:
                self._cache = None

    @staticmethod
    def split_plan(group: tuple, spans) -> tuple[tuple, ...]:
        """The group's layers as runs that are one piece each of its stacked weights: a span, or one layer."""
        starts = {tuple(span)[0]: tuple(span) for span in spans if tuple(span)[0] in group}
        runs, i = [], 0
        while i < len(group):
            run = starts.get(group[i], (group[i],))
            if group[i:i + len(run)] != run:
                raise ValueError("a span must be consecutive layers of one fan-in group")
            runs.append(run)
            i += len(run)
        return tuple(runs)

    def row_scale(self, i: int) -> torch.Tensor:
        """(R, 1): the constant scale times the learned gain of each row of group i."""
        scale = getattr(self, f"row_scale{i}")
        gains = [layer.gain.reshape(-1) for layer in self.groups[i] if layer.gain is not None]
        if not gains:
            return scale
        return scale * torch.cat([*gains, self.one])[getattr(self, f"gain_index{i}")]

    def _version(self, dtype: torch.dtype) -> tuple:
        tensors = [p for layer in self.layers for p in (layer.weight, layer.gain) if p is not None]
        return (dtype, *((id(t), t.data_ptr(), t._version) for t in tensors))

    def prepare(self, dtype: torch.dtype, training: bool, stack: bool) -> None:
        forced = {}  # group (stacked) or layer -> its ForcedRows: the traditional normalization's input as well
        if training:
            for scale, group in self.forced_groups:
                if stack:
                    forced[group] = force_normalize_([layer.weight for layer in group], scale)
                else:
                    forced.update((layer, force_normalize_([layer.weight], scale)) for layer in group)
        cacheable = self.reuse and not (training or torch.is_grad_enabled() or torch.compiler.is_compiling())
        key = (stack, self._version(dtype))
        if cacheable and self._cache is not None and self._cache[0] == key:
            self.spans, weights = self._cache[1]
        else:
            self.spans, weights = {}, []
            if stack:
                for i, (group, runs) in enumerate(zip(self.groups, self.pieces)):
                    stacked = GroupedWeightNorm.apply(self.row_scale(i), dtype, *forced.get(group, (None, None)),
                                                      *(layer.weight for layer in group))
                    pieces = stacked.split([sum(layer.weight.shape[0] for layer in run) for run in runs])  # (R, F)
                    for run, piece in zip(runs, pieces):
                        self.spans[run] = piece
                        rows = piece.split([layer.weight.shape[0] for layer in run]) if len(run) > 1 else [piece]
                        weights += [r.view_as(layer.weight) for r, layer in zip(rows, run)]
            else:
                weights = [layer.normalized_weight(dtype, forced[layer].rms if layer in forced else None)
                           for group in self.groups for layer in group]
            self._cache = (key, (self.spans, weights)) if cacheable else None
        for layer, weight in zip((layer for group in self.groups for layer in group), weights):
            layer.current_weight = weight
        for layer in self.layers:
            if not layer.traditional:  # forced only: the stored weight itself, already normalized above
                layer.current_weight = layer.normalized_weight(dtype)

    def span(self, layers: list[WeightNormalized]) -> torch.Tensor | None:
        """The prepared weights of a span given at construction (or of one layer), as one (sum of out, fan_in)
        matrix; None when this forward did not stack them."""
        return self.spans.get(tuple(layers))

    def release(self) -> None:
        self.spans = {}
        for layer in self.layers:
            layer.current_weight = None


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
