"""The Diffusion Transformer: DiT (Peebles & Xie 2023) with every magnitude-preserving switch and
conditioning variant of DESIGN.md one config field away.

With mp=() and conditioning='adaln-zero' this is DiT layer for layer and initialized as DiT;
with mp='all' and conditioning='scale-rotation-gate' it is the paper's MP model with rotation modulation.
"""

import contextlib
import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from mpdit.errors import MPDiTError
from mpdit.model.config import DiTConfig
from mpdit.nn.dyt import DynamicTanh
from mpdit.nn.modulation import ConditionProjection, apply_modulation, conditioning_ops, modulation_coefficients
from mpdit.nn.primitives import (
    MPEmbedding,
    MPFourier,
    MPLinear,
    MPSiLU,
    WeightNormalized,
    WeightNormBank,
    autocast_dtype,
    mp_pos_embed_2d,
    mp_sum,
    normalize,
    sincos_pos_embed_2d,
    timestep_sinusoidal,
)
from mpdit.files import load_safetensors, read_json
from mpdit.hub_access import from_hub


def make_linear(cfg: DiTConfig, in_features: int, out_features: int, *, zero_init: bool = False,
                input_gain: float = 1.0) -> nn.Module:
    """A linear layer as the switches want it: nn.Linear (DiT), or MPLinear (weight_norm / forced_weight_norm).

    weight_norm: no bias; a zero-init layer gets a learned gain starting at 0.
    forced_weight_norm alone: DiT's layer with bias whose weight rows are kept at norm 1 in training;
    DiT's zero-init layers are left alone then, since without a gain forcing them to unit rows would undo the zero init.
    """
    weight_norm, forced = cfg.has("weight_norm"), cfg.has("forced_weight_norm")
    if weight_norm:
        return MPLinear(in_features, out_features, traditional=True, forced=forced,
                        learned_gain=0.0 if zero_init else None, input_gain=input_gain)
    if forced and not zero_init:
        return MPLinear(in_features, out_features, traditional=False, forced=True, bias=True, input_gain=input_gain)
    assert input_gain == 1.0, "only MPLinear folds an input gain"
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight)  # DiT's basic init: xavier-uniform weight, zero bias
    nn.init.zeros_(layer.bias)
    if zero_init:
        nn.init.zeros_(layer.weight)
    return layer


def activation(cfg: DiTConfig, default: nn.Module) -> nn.Module:
    return MPSiLU() if cfg.has("mp_silu") else default


class PatchEmbed(nn.Module):
    """Patchify (N, C, H, W) -> tokens (N, T, D): DiT's strided conv, or an MP conv on [x, 1] (bias EDM2-style)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.constant_channel = cfg.has("weight_norm")
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
        if self.constant_channel:
            self.proj = MPLinear(c + 1, d, patch_size=p, forced=cfg.has("forced_weight_norm"))
        elif cfg.has("forced_weight_norm"):
            self.proj = MPLinear(c, d, patch_size=p, traditional=False, forced=True, bias=True)
        else:
            self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p)
            nn.init.xavier_uniform_(self.proj.weight.view(d, -1))
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.constant_channel:
            x = F.pad(x, (0, 0, 0, 0, 0, 1), value=1.0)  # (N, C + 1, H, W): a constant-1 channel
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (N, T, D); row-major, so linears stay matmuls


class TimestepEmbedder(nn.Module):
    """Time input t (N,) -> (N, D). DiT: 256 sinusoidal features of t (a step in 0..999: DDPM's step, or 1000 times
    the flow time); MP: MPFourier of t (EDM2's ln(sigma)/4, which the objective computes, or the raw step)."""

    def __init__(self, cfg: DiTConfig, num_features: int = 256):
        super().__init__()
        self.mp = cfg.has("mp_embedding")
        d = cfg.hidden_size
        if self.mp:
            self.fourier = MPFourier(num_features)
            # mp_silu = silu / 0.596, the constant folded into the next layer's weight
            self.mlp = nn.Sequential(MPLinear(num_features, d), nn.SiLU(), MPLinear(d, d, input_gain=1 / 0.596))
        else:
            self.mlp = nn.Sequential(make_linear(cfg, num_features, d), activation(cfg, nn.SiLU()),
                                     make_linear(cfg, d, d))
            for layer in (self.mlp[0], self.mlp[2]):
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=0.02)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.mp:
            features = self.fourier(t.float())  # (N, 256), unit RMS
        else:
            features = timestep_sinusoidal(t)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class y (N,) -> (N, D), with a null class (index num_classes) for classifier-free guidance.

    Label dropout (replacing y by the null class with probability class_dropout_prob) is done by the
    training loop from its seeded per-step generator, not here, so runs are reproducible across ranks.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)
        if cfg.has("mp_embedding"):
            self.embedding_table = MPEmbedding(rows, cfg.hidden_size)
        else:
            self.embedding_table = nn.Embedding(rows, cfg.hidden_size)
            nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention (N, T, D) -> (N, T, D); cosine attention normalizes q and k per head."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.cosine = cfg.has("cosine_attention")
        self.normalize_output = self.cosine and cfg.normalize_attention_output
        self.qkv = make_linear(cfg, cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = make_linear(cfg, cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        qk, v = qkv.split([2, 1])  # (2, N, H, T, d_head), (1, N, H, T, d_head)
        if self.cosine:
            qk = normalize(qk, dim=-1)  # q and k at RMS 1 over the head dimension
        (q, k), v = qk.unbind(0), v.squeeze(0)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        if self.normalize_output:
            x = normalize(x, dim=-1)  # averaging values shrinks their magnitude; restore RMS 1 per head
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    """Linear, GELU(tanh) or mp_silu, Linear: (N, T, D) -> (N, T, D)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        # mp_silu(h) = silu(h) / 0.596: when fc2 is an MPLinear the constant is folded into its weight
        fold = cfg.has("mp_silu") and (cfg.has("weight_norm") or cfg.has("forced_weight_norm"))
        self.fc1 = make_linear(cfg, cfg.hidden_size, hidden)
        self.act = nn.SiLU() if fold else activation(cfg, nn.GELU(approximate="tanh"))
        self.fc2 = make_linear(cfg, hidden, cfg.hidden_size, input_gain=1 / 0.596 if fold else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_norm(cfg: DiTConfig) -> nn.Module:
    if cfg.has("no_layernorm"):
        return nn.Identity()
    if cfg.norm == "dyt":
        return DynamicTanh()
    return nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)


def make_modulation(cfg: DiTConfig, ops: tuple[str, ...], suffixes: tuple[str, ...]) -> ConditionProjection:
    names = [op + suffix for suffix in suffixes for op in ops]
    return ConditionProjection(cfg.hidden_size, cfg.hidden_size, names, weight_norm=cfg.has("weight_norm"),
                               forced=cfg.has("forced_weight_norm"), zero_init=cfg.zero_init)


def residual_scales(cfg: DiTConfig, depth: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """How a network of `depth` blocks carries an mp_residual stream: divided by S_k = w^k after its k-th mp_sum
    (w = (1 - t) / c, mp_sum's stream weight), so that mp_sum(x, g b, t) = w x + (t / c) g b becomes one
    multiply-add y + g b (t / c) / S_(k+1) on the carried y = x / S_k; S_k is folded into the coefficients of
    what reads the stream (its modulation; nothing before a scale-free LayerNorm). Returns S_k and
    (t / c) / S_(k+1) for each block's two sums, (1, depth, 2, 1) each, and w; None without mp_residual.
    """
    if not cfg.has("mp_residual"):
        return None
    t = cfg.residual_balance
    c = math.sqrt((1 - t) ** 2 + t**2)
    w = (1 - t) / c
    k = torch.arange(2 * depth, dtype=torch.float64).view(1, depth, 2, 1)
    return (w**k).float(), (t / c / w ** (k + 1)).float(), w


def folds_stream_scale(cfg: DiTConfig) -> bool:
    """Whether the carried stream's scale is folded into the modulation (no LayerNorm, which ignores it, reads it)."""
    return cfg.has("mp_residual") and cfg.has("no_layernorm")


def per_block(coefficients: dict, depth: int) -> list[tuple[dict, dict]]:
    """Coefficients of `depth` blocks, tensors (N, depth, 2, ...) -> each block's (msa, mlp) coefficients, tensors
    (N, 1, ...). One unbind per tensor, whose backward stacks the 2 depth gradients in one kernel."""
    leaves, spec = tree_flatten(coefficients)
    parts = [v.unsqueeze(3).flatten(1, 2).unbind(1) if torch.is_tensor(v) else [v] * (2 * depth) for v in leaves]
    trees = [tree_unflatten([part[i] for part in parts], spec) for i in range(2 * depth)]
    return list(zip(trees[0::2], trees[1::2]))


class DiTBlock(nn.Module):
    """x = x (+) gate1 * attn(mod1(norm(x))); x = x (+) gate2 * mlp(mod2(norm(x))), (+) = + or mp_sum.

    With mp_residual the stream inside the block (and between the blocks of MPDiT) is carried divided by the
    product of mp_sum's stream weights so far (residual_scales): each mp_sum is then one multiply-add.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.ops = conditioning_ops(cfg.conditioning)
        self.gate_offset = 0.0 if cfg.conditioning == "adaln-zero" else 1.0  # DiT's gate starts at 0, MP's at 1
        self.fold_stream_scale = folds_stream_scale(cfg)
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.modulation = make_modulation(cfg, self.ops, ("_msa", "_mlp"))
        self.widths = self.modulation.widths[:len(self.ops)]  # one sum's projections (msa's, then mlp's)
        stream_scale, branch_scale, weight = residual_scales(cfg, 1) or (None, None, 1.0)
        self.output_scale = weight**2
        self.register_buffer("stream_scale", stream_scale, persistent=False)  # for a block used alone
        self.register_buffer("branch_scale", branch_scale, persistent=False)

    def coefficients(self, rows: torch.Tensor, stream_scale: torch.Tensor | None,
                     branch_scale: torch.Tensor | None) -> dict:
        """Modulation and residual coefficients of L blocks at once from their projections rows (N, L, 2 W)
        (per block: msa's, then mlp's), as tensors (N, L, 2, ...); the scales (1, L, 2, 1) of residual_scales."""
        vectors = dict(zip(self.ops, rows.unflatten(-1, (2, -1)).split(self.widths, dim=-1)))  # (N, L, 2, width)
        return {"modulation": modulation_coefficients(vectors, input_scale=stream_scale if self.fold_stream_scale
                                                      else None),
                "gate": self.branch_coefficient(vectors.get("gate"), branch_scale)}

    def branch_coefficient(self, gate: torch.Tensor | None, branch_scale: torch.Tensor | None) -> torch.Tensor | None:
        """What the residual multiplies the branch by: g = gate_offset + gate, and with mp_residual times
        branch_scale, mp_sum's t / c over the stream's scale after the sum. The float32 scale times the gate is
        rounded to the gate's dtype per element, not the scale once (a bias: see modulation_coefficients)."""
        if branch_scale is None:
            return gate if gate is None or self.gate_offset == 0 else gate + self.gate_offset
        if gate is None:
            return branch_scale
        product = torch.addcmul(branch_scale, gate, branch_scale) if self.gate_offset else gate * branch_scale
        return product.to(gate.dtype)

    def residual(self, x: torch.Tensor, branch: torch.Tensor, coefficient: torch.Tensor | None) -> torch.Tensor:
        """x + coefficient * branch (branch_coefficient): DiT's residual, or mp_sum on the carried stream."""
        return x + branch if coefficient is None else torch.addcmul(x, branch, coefficient)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, coefficients: tuple | None = None) -> torch.Tensor:
        """x (N, T, D) and the condition c (N, D); or, inside MPDiT, the stream as MPDiT carries it and this block's
        (msa, mlp) coefficients from MPDiT.conditioning."""
        alone = coefficients is None
        if alone:
            rows = self.modulation.proj(c).unsqueeze(1)  # (N, 1, 2 W)
            coefficients = per_block(self.coefficients(rows, self.stream_scale, self.branch_scale), 1)[0]
        msa, mlp = coefficients
        x = self.residual(x, self.attn(apply_modulation(self.norm1(x), msa["modulation"])), msa["gate"])
        x = self.residual(x, self.mlp(apply_modulation(self.norm2(x), mlp["modulation"])), mlp["gate"])
        return x * self.output_scale if alone and self.output_scale != 1 else x  # (N, T, D)


class FinalLayer(nn.Module):
    """norm, modulation (no gate), zero-init linear to p * p * out_channels per token."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm_final = make_norm(cfg)
        ops = tuple(op for op in conditioning_ops(cfg.conditioning) if op != "gate")
        self.modulation = make_modulation(cfg, ops, ("",))
        self.linear = make_linear(cfg, cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels,
                                  zero_init=cfg.zero_init)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, coefficients: tuple | None = None) -> torch.Tensor:
        k = coefficients if coefficients is not None else modulation_coefficients(self.modulation(c))
        return self.linear(apply_modulation(self.norm_final(x), k))  # (N, T, p*p*C_out)


class MPDiT(nn.Module, PyTorchModelHubMixin, library_name="mpdit", tags=["diffusion", "dit", "mpdit"]):
    """Class-conditional Diffusion Transformer; forward(x (N, C, H, W), t (N,), y (N,)) -> (N, C_out, H, W).

    t is the time input (N,) that the objective computes (mpdit.diffusion.objectives): for DiT's timestep
    embedder a step-like value in 0..999 (DDPM's integer step, or 1000 times the flow time), for the MP embedder
    EDM2's ln(sigma)/4 (or the raw step). The model knows nothing of the objective.
    y class indices in [0, num_classes], num_classes being the null class.
    Saves and loads as config.json + model.safetensors (save_pretrained / from_pretrained).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = LabelEmbedder(cfg)
        grid = cfg.input_size // cfg.patch_size
        table = mp_pos_embed_2d if cfg.has("mp_pos_embed") else sincos_pos_embed_2d
        self.pos_embed = nn.Parameter(table(cfg.hidden_size, grid).unsqueeze(0), requires_grad=False)  # (1, T, D)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.act = activation(cfg, nn.SiLU())
        self.projections = [block.modulation for block in self.blocks] + [self.final_layer.modulation]
        # the modulation projections last, so that each group keeps them side by side (one matmul for all)
        last = [p.proj for p in self.projections]
        layers = [m for m in self.modules() if isinstance(m, WeightNormalized) and m not in last]
        layers += [m for m in last if isinstance(m, WeightNormalized)]
        spans = [[p.proj for p in self.projections]] if cfg.has("weight_norm") else []
        self.weight_norm = WeightNormBank(layers, spans) if layers else None
        self.stack_weights: bool | None = None  # see stacking()
        # the carried stream's scales (residual_scales); block_output_scales: what each block's output is times
        stream_scale, branch_scale, weight = residual_scales(cfg, cfg.depth) or (None, None, 1.0)
        self.register_buffer("stream_scale", stream_scale, persistent=False)
        self.register_buffer("branch_scale", branch_scale, persistent=False)
        self.block_output_scales = [weight ** (2 * (i + 1)) for i in range(cfg.depth)]
        final_scale = torch.full((1, 1, 1), weight ** (2 * cfg.depth)) if folds_stream_scale(cfg) else None
        self.register_buffer("final_scale", final_scale, persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "MPDiT":
        """PyTorchModelHubMixin.from_pretrained (a local folder or a Hub id), failing within seconds and in one line
        when the Hub cannot be reached and the id is not in the local cache (mpdit.hub_access.from_hub)."""
        name = str(pretrained_model_name_or_path)
        return from_hub(name, "the model", lambda offline: super(MPDiT, cls).from_pretrained(
            name, **{**kwargs, "local_files_only": kwargs.get("local_files_only", False) or offline}),
            "pass a local folder holding config.json and model.safetensors")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download: bool = False,
                         local_files_only: bool = False, token=None, map_location: str = "cpu", strict: bool = True,
                         **_model_kwargs) -> "MPDiT":
        """from_pretrained's loader (PyTorchModelHubMixin hook), strict: the model is rebuilt from config.json with
        load_model's checks (unknown or ill-typed keys refused) and every tensor must match it, key and shape."""
        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import hf_hub_download

            for name in ("config.json", "model.safetensors"):
                folder = Path(hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                              force_download=force_download, local_files_only=local_files_only)).parent
        return load_model(folder, device=map_location).eval()

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise MPDiTError(f"expected x of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        n = x.shape[0]
        if t.shape != (n,) or y.shape != (n,):
            raise MPDiTError(f"expected t and y of shape ({n},), got {tuple(t.shape)} and {tuple(y.shape)}")

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (N, T, D) with position, and the activated condition (N, D)."""
        tokens = self.x_embedder(x)
        pos = self.pos_embed.to(tokens.dtype)
        tokens = mp_sum(tokens, pos, 0.5) if self.config.has("mp_pos_embed") else tokens + pos
        t_emb, y_emb = self.t_embedder(t), self.y_embedder(y)
        c = mp_sum(t_emb, y_emb, 0.5) if self.config.has("mp_embedding") else t_emb + y_emb
        return tokens, self.act(c)

    def stacking(self, device: torch.device) -> bool:
        """Whether a forward stacks weights: each fan-in group's weight normalization in one pass, and all modulation
        projections in one matmul. `stack_weights` if set, else on CUDA: stacking launches a few large kernels
        instead of many small ones (a GPU's bound) but copies the weights into the stack and the gradients out of
        it, which on a CPU, bound by memory traffic, costs more than the launches it saves."""
        return device.type == "cuda" if self.stack_weights is None else self.stack_weights

    def conditioning(self, c: torch.Tensor) -> tuple[list[tuple[dict, dict]], tuple]:
        """Every block's and the final layer's coefficients from the condition c (N, D): one matmul for all
        projections, and each coefficient computed for all blocks at once."""
        projections, n, depth = self.projections, c.shape[0], len(self.blocks)
        if not self.stacking(c.device):
            out = torch.cat([p.proj(c) for p in projections], dim=-1)  # (N, all widths)
        elif self.config.has("weight_norm"):  # the weight-norm bank prepared them side by side
            out = F.linear(c, self.weight_norm.span([p.proj for p in projections]))
        else:
            out = F.linear(c, torch.cat([p.proj.weight for p in projections]),
                           torch.cat([p.proj.bias for p in projections]))
        final = projections[-1]
        blocks, last = out.split([out.shape[1] - sum(final.widths), sum(final.widths)], dim=-1)
        rows = blocks.view(n, depth, -1)  # (N, L, 2 W)
        blocks_k = self.blocks[0].coefficients(rows, self.stream_scale, self.branch_scale) if depth else {}
        final_vectors = dict(zip(final.names, last.unsqueeze(1).split(final.widths, dim=-1)))
        return per_block(blocks_k, depth), modulation_coefficients(final_vectors, input_scale=self.final_scale)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); token features ordered (p, q, c), tokens row-major."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def reusing_weights(self):
        """A context in which eval-mode no-grad forwards compute the normalized weights once (WeightNormBank's
        reusing_weights): for a loop that does not change the weights, such as sampling."""
        return self.weight_norm.reusing_weights() if self.weight_norm is not None else contextlib.nullcontext()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, y)
        if self.weight_norm is not None:  # every layer's normalized weight, computed together
            self.weight_norm.prepare(autocast_dtype(x.device, self.pos_embed.dtype), self.training,
                                     self.stacking(x.device))
        tokens, c = self.embed(x, t, y)
        block_coefficients, final_coefficients = self.conditioning(c)
        for block, k in zip(self.blocks, block_coefficients):
            tokens = block(tokens, None, k)
        out = self.unpatchify(self.final_layer(tokens, None, final_coefficients))
        if self.weight_norm is not None:
            self.weight_norm.release()
        return out

    def guided_forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: eps = eps_null + s (eps_y - eps_null) on all C noise channels.

        The variance channels are the conditional ones. cfg_scale 1 is the plain conditional forward.
        """
        if cfg_scale < 0:
            raise MPDiTError(f"guidance scale must be >= 0, got {cfg_scale}")
        if cfg_scale == 1 or self.config.class_dropout_prob == 0:
            return self(x, t, y)
        null = torch.full_like(y, self.config.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        ch = self.config.in_channels
        eps = torch.lerp(uncond[:, :ch], cond[:, :ch], cfg_scale)  # uncond + s (cond - uncond)
        return torch.cat([eps, cond[:, ch:]], dim=1)

    def num_params(self) -> int:
        """sum(p.numel()) over all parameters, including the fixed position table (as DiT counts)."""
        return sum(p.numel() for p in self.parameters())


def count_params(config: DiTConfig) -> int:
    """sum(p.numel()) over the model's parameters, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return MPDiT(config).num_params()


def estimated_params(config: DiTConfig) -> int:
    """count_params(config) without building the model (a hidden size or depth of 1e9 cannot be built, even on the
    meta device: the position table is computed): small models of the same kind are counted on the meta device
    (hidden sizes u, 2u, 3u, each at depth 1 and 2, on a 2x2 patch grid) and extrapolated, quadratically along the
    hidden size, linearly along the depth and the position table's tokens. Exact unless hidden * mlp_ratio rounds."""
    unit = 4 * config.num_heads  # divisible by the heads, even (rotations), a multiple of 4 (2-D sin-cos table)
    small = [[count_params(dataclasses.replace(config, hidden_size=k * unit, depth=depth,
                                               input_size=2 * config.patch_size)) for depth in (1, 2)]
             for k in (1, 2, 3)]

    def along_hidden(values: list[int]) -> float:  # the quadratic through (k, values[k - 1]), k = 1..3, at the size
        k = config.hidden_size / unit
        return (values[0] * (k - 2) * (k - 3) / 2 - values[1] * (k - 1) * (k - 3) + values[2] * (k - 1) * (k - 2) / 2)

    first, second = along_hidden([c[0] for c in small]), along_hidden([c[1] for c in small])
    tokens = (config.input_size // config.patch_size) ** 2
    return round(first + (config.depth - 1) * (second - first) + (tokens - 4) * config.hidden_size)


def device_memory(device: torch.device | str) -> int:
    """Bytes of memory of ``device``: a GPU's total, or the machine's physical memory for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require_memory(config: DiTConfig, device: torch.device | str, bytes_per_param: int, what: str) -> None:
    """A one-line MPDiTError with the estimate when ``bytes_per_param`` bytes for each parameter (estimated_params) do
    not fit the memory of ``device``: checked before anything is allocated, so an absurd size (a config's hidden size
    or depth of 1e9) is refused rather than exhausting the machine."""
    params = estimated_params(config)
    need, have = params * bytes_per_param, device_memory(device)
    if need > have:
        raise MPDiTError(f"model config {config.name} (hidden size {config.hidden_size:,}, depth {config.depth:,}, "
                         f"{config.input_size}x{config.input_size} input): about {params:,} parameters need "
                         f"{need / 2**30:,.1f} GiB for {what}, more than the {have / 2**30:,.1f} GiB of "
                         f"{torch.device(device)}: choose a smaller model")


def compile_default(compile_model: bool | None, device: torch.device) -> bool:
    """Whether to torch.compile: as asked, else on CUDA (where an eager step is bound by kernel launches) and not on
    CPU (compiling takes minutes there for a gain of about 1.2x, docs/performance.md)."""
    return torch.device(device).type == "cuda" if compile_model is None else compile_model


def build_model(model: str = "DiT-S/2", **overrides) -> MPDiT:
    """A model from the zoo, e.g. build_model('DiT-S/2', mp='all', conditioning='scale-rotation-gate')."""
    return MPDiT(DiTConfig.from_preset(model, **overrides))


def load_model(path: str | Path, weights: str = "model.safetensors", device: str | torch.device = "cpu") -> MPDiT:
    """Rebuild the model from PATH/config.json alone and load PATH/<weights>; one-line errors otherwise."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise MPDiTError(f"no model config at {config_path}: pass a checkpoint folder holding config.json")
    config = DiTConfig.from_saved(read_json(config_path, "model config"), str(config_path))
    for where in {torch.device("cpu"), torch.device(device)}:  # built on the CPU, then moved
        require_memory(config, where, 4, "its float32 weights")
    model = MPDiT(config)
    load_state_dict_checked(model, load_safetensors(path / weights, device), str(path / weights))
    return model.to(device)


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    """load_state_dict with a one-line error naming the first missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise MPDiTError(f"{source}: missing key '{key}' (does the checkpoint belong to this model config?)")
        if tuple(state[key].shape) != tuple(value.shape):
            raise MPDiTError(f"{source}: key '{key}' has shape {tuple(state[key].shape)}, "
                             f"the model expects {tuple(value.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise MPDiTError(f"{source}: unexpected key '{extra[0]}' (does the checkpoint belong to this model config?)")
    model.load_state_dict(state)
