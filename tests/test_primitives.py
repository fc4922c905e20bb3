"""Magnitude-preserving primitives: each formula, each unit-magnitude claim."""

import math

import pytest
import torch
from torch import nn

from mpdit.model import build_model
from mpdit.model.config import DiTConfig
from mpdit.model.dit import Attention
from mpdit.nn.primitives import (MPEmbedding, MPFourier, MPLinear, mp_pos_embed_2d, mp_silu, mp_sum, normalize,
                                 sincos_pos_embed_2d)


def rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_normalize_gives_unit_rms_rows():
    w = torch.randn(64, 32, 3) * 7.0
    rows = normalize(w).pow(2).mean(dim=(1, 2)).sqrt()
    assert torch.allclose(rows, torch.ones(64), atol=1e-4)
    # the formula w / (eps + ||w|| / sqrt(n)) itself
    expected = w / (1e-4 + w.flatten(1).norm(dim=1) / math.sqrt(96))[:, None, None]
    assert torch.allclose(normalize(w), expected, atol=1e-6)


def test_mplinear_keeps_unit_magnitude():
    x = torch.randn(8192, 256)  # unit RMS
    layer = MPLinear(256, 512)
    assert abs(rms(layer(x)) - 1) < 0.05
    # fan-in scaling: a layer with 4x the inputs still gives unit output
    assert abs(rms(MPLinear(1024, 256)(torch.randn(4096, 1024))) - 1) < 0.05


def test_mplinear_zero_init_outputs_zero_but_has_random_weights():
    layer = MPLinear(16, 8, learned_gain=0.0)
    assert torch.count_nonzero(layer(torch.randn(4, 16))) == 0
    assert layer.weight.abs().sum() > 0 and layer.gain.requires_grad


def test_mplinear_patch_conv_matches_linear_on_patches():
    layer = MPLinear(3, 8, patch_size=2).eval()
    x = torch.randn(2, 3, 4, 4)
    patches = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(2, 4, 12)  # (N, T, C*p*p)
    expected = patches @ layer.effective_weight(torch.float32).reshape(8, 12).T
    assert torch.allclose(layer(x).flatten(2).transpose(1, 2), expected, atol=1e-5)


def test_mplinear_eval_cache_tracks_parameter_changes():
    layer = MPLinear(8, 4).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = layer(x)
        layer.weight.mul_(-1)
        assert torch.allclose(layer(x), -first, atol=1e-6)


def test_mp_silu_keeps_unit_magnitude():
    assert abs(rms(mp_silu(torch.randn(1_000_000))) - 1) < 0.05


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_formula_and_unit_magnitude(t):
    a, b = torch.randn(100_000), torch.randn(100_000)
    assert torch.allclose(mp_sum(a, b, t), ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2), atol=1e-6)
    assert abs(rms(mp_sum(a, b, t)) - 1) < 0.05


def test_cosine_attention_keeps_unit_magnitude():
    cfg = DiTConfig(hidden_size=256, num_heads=4, input_size=16, patch_size=2, mp="all")
    x = torch.randn(32, 64, 256)
    out = [rms(Attention(cfg)(x)) for _ in range(4)]  # several random layers
    print("cosine attention output RMS per layer:", [round(v, 3) for v in out])
    assert abs(sum(out) / len(out) - 1) < 0.05
    # why the output is rescaled: a plain average of independent values shrinks their magnitude
    plain = Attention(DiTConfig(hidden_size=256, num_heads=4, input_size=16, mp="all",
                                normalize_attention_output=False))
    assert rms(plain(x)) < 0.5


def test_cosine_attention_is_invariant_to_query_key_scale():
    cfg = DiTConfig(hidden_size=64, num_heads=2, input_size=8, mp="cosine_attention")
    attn = Attention(cfg)
    x = torch.randn(2, 16, 64)
    q, k, v = attn.qkv(x).reshape(2, 16, 3, 2, 32).permute(2, 0, 3, 1, 4)
    # logits are bounded by sqrt(d_head) whatever the input scale
    qn, kn = normalize(q, dim=-1), normalize(k, dim=-1)
    assert (qn @ kn.transpose(-1, -2) / math.sqrt(32)).abs().max() <= math.sqrt(32) + 1e-3


def test_fourier_and_label_embeddings_have_unit_magnitude():
    assert abs(rms(MPFourier(256)(torch.linspace(-1.2, 1.3, 4096))) - 1) < 0.05
    table = MPEmbedding(11, 64)
    rows = table(torch.arange(11)).pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rows, torch.ones(11), atol=1e-3)


def test_position_tables():
    table = sincos_pos_embed_2d(64, 4)
    assert table.shape == (16, 64)
    # first half encodes the column (w), second half the row (h), each [sin | cos]
    assert torch.allclose(table[1, :16], torch.sin(torch.tensor(1.0) / 10000 ** (torch.arange(16) / 16.0)),
                          atol=1e-6)
    assert torch.allclose(table[4, 32:48], torch.sin(torch.tensor(1.0) / 10000 ** (torch.arange(16) / 16.0)),
                          atol=1e-6)
    mp_table = mp_pos_embed_2d(64, 4)
    assert torch.allclose(mp_table.mean(dim=0), torch.zeros(64), atol=1e-5)
    assert abs(rms(mp_table) - 1) < 1e-5


def residual_stream_rms(seed: int, **overrides) -> list[float]:
    """RMS of the token stream after the embedding and after each block of an all-MP DiT-S/2 at init."""
    torch.manual_seed(seed)
    model = build_model("DiT-S/2", input_size=16, mp="all", conditioning="scale-rotation-gate", **overrides).eval()
    x, t, y = torch.randn(32, 4, 16, 16), torch.randint(0, 1000, (32,)), torch.randint(0, 1000, (32,))
    with torch.no_grad():
        tokens, c = model.embed(x, t, y)
        figures = [rms(tokens)]
        for block in model.blocks:
            tokens = block(tokens, c)
            figures.append(rms(tokens))
    return figures


def test_residual_stream_of_all_mp_network_stays_at_unit_magnitude():
    """Per-block RMS of the residual stream at init, averaged over 4 random inits (single
    random matrices of width 384 move a given input's magnitude by a few percent either way)."""
    mean = torch.tensor([residual_stream_rms(seed) for seed in range(4)]).mean(dim=0)
    print("residual stream RMS after embedding and each block:", [round(v, 3) for v in mean.tolist()])
    assert ((mean - 1).abs() < 0.05).all(), mean
    # without rescaling the attention output, averaging values shrinks the stream block by block
    plain = residual_stream_rms(0, normalize_attention_output=False)
    print("same with plain attention averages:", [round(v, 3) for v in plain])
    assert plain[-1] < 0.7


def test_forced_weight_norm_keeps_rows_at_unit_rms_through_training():
    torch.manual_seed(0)
    model = build_model("DiT-Nano/4", input_size=16, in_channels=1, num_classes=10, mp="all",
                        conditioning="scale-rotation-gate")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t, y = torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    target = torch.randn(8, 2, 16, 16)
    for _ in range(5):
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    def worst_row_deviation():
        return max((m.weight.flatten(1).pow(2).mean(dim=1).sqrt() - 1).abs().max().item()
                   for m in model.modules() if isinstance(m, (MPLinear, MPEmbedding)))

    assert worst_row_deviation() > 1e-4, "the optimizer should move rows off unit RMS between steps"
    model(x, t, y)  # a training forward applies the forced normalization
    assert worst_row_deviation() < 1e-3
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())


@pytest.mark.parametrize("learned_gain", [None, 0.7])
def test_mplinear_recomputed_weight_gives_autograd_gradients(learned_gain):
    layer = MPLinear(16, 8, learned_gain=learned_gain, forced=False)
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = layer(x)  # training mode: the weight is recomputed in backward, not saved
    grad = torch.randn_like(out)
    params = [x, layer.weight] + ([layer.gain] if layer.gain is not None else [])
    fused = torch.autograd.grad(out, params, grad)
    gain = 1.0 if layer.gain is None else layer.gain
    plain_out = torch.nn.functional.linear(x, normalize(layer.weight) * gain / math.sqrt(16))  # EDM2 eq. 66
    plain = torch.autograd.grad(plain_out, params, grad)
    assert torch.allclose(out, plain_out, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fused, plain))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(layer.weight.grad).all()
