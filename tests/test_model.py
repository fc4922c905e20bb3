"""The model: modulation, switches, parameter counts, DiT equivalence, converter, save/load, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpdit.model.dit import count_params
from mpdit.errors import MPDiTError
from mpdit.model import MP_SWITCHES, DiTConfig, MPDiT, build_model, load_model
from mpdit.model.convert import from_official, infer_config, load_official_checkpoint, load_official_state_dict, \
    to_official
from mpdit.nn.modulation import CONDITIONINGS, RotationModulation, modulate, rotate, scale, shift
from mpdit.nn.primitives import MPLinear, MPSiLU, mp_silu, mp_sum, normalize

SMALL = dict(input_size=8, in_channels=2, num_classes=5)


def perturbed(model: MPDiT, seed: int = 0) -> MPDiT:
    """Give every parameter random values, so zero-init layers do not hide errors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def inputs(cfg: DiTConfig, n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    return x, torch.randint(0, 1000, (n,), generator=gen), torch.randint(0, cfg.num_classes, (n,), generator=gen)


# --- modulation -----------------------------------------------------------------------------

def test_rotation_preserves_every_token_norm_and_matches_2x2_rotations():
    x = torch.randn(4, 10, 64)
    theta = torch.randn(4, 1, 32) * 10
    out = rotate(x, theta)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-5)
    i = 5  # channel i pairs with i + D/2
    c, s = theta[..., i].cos(), theta[..., i].sin()
    assert torch.allclose(out[..., i], x[..., i] * c - x[..., i + 32] * s, atol=1e-6)
    assert torch.allclose(out[..., i + 32], x[..., i] * s + x[..., i + 32] * c, atol=1e-6)
    assert torch.allclose(rotate(out, -theta), x, atol=1e-5)


@pytest.mark.parametrize("conditioning", list(CONDITIONINGS))
@pytest.mark.parametrize("mp", ["none", "all"])
def test_every_modulation_starts_as_identity(conditioning, mp):
    model = build_model("DiT-Nano/2", mp=mp, conditioning=conditioning, **SMALL)
    x, t, y = inputs(model.config)
    tokens, c = model.embed(x, t, y)
    for projection in [b.modulation for b in model.blocks] + [model.final_layer.modulation]:
        vectors = projection(c)
        assert all(torch.count_nonzero(v) == 0 for v in vectors.values())
        assert torch.equal(modulate(tokens, vectors, "_msa"), tokens)
        assert torch.equal(modulate(tokens, vectors, ""), tokens)


def test_gates_start_at_one_for_mp_and_zero_for_adaln_zero():
    for conditioning, expected in [("scale-rotation-gate", 1.0), ("adaln-zero", 0.0)]:
        model = build_model("DiT-Nano/2", mp="all", conditioning=conditioning, **SMALL)
        x, t, y = inputs(model.config)
        _, c = model.embed(x, t, y)
        block = model.blocks[0]
        gate = block.gate_offset + block.modulation(c)["gate_msa"]
        assert torch.equal(gate, torch.full_like(gate, expected))
    # adaln-zero block is the identity at init (gate 0); the MP block is not (gate 1)
    dit = build_model("DiT-Nano/2", **SMALL)
    tokens, c = dit.embed(*inputs(dit.config))
    assert torch.equal(dit.blocks[0](tokens, c), tokens)


def test_rotation_modulation_is_a_drop_in_module():
    module = RotationModulation(dim=16, cond_dim=8)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 8)
    assert torch.equal(module(x, c), x)
    with torch.no_grad():
        module.angles.proj.gain.fill_(1.0)
    out = module(x, c)
    assert not torch.allclose(out, x)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    with pytest.raises(MPDiTError, match="even"):
        RotationModulation(dim=15, cond_dim=8)


def direct_mp_forward(model: MPDiT, x, t, y) -> torch.Tensor:
    """The network written as DESIGN.md has it: x = mp_sum(x, (1 + gate) * branch(modulate(norm(x))), t) per sum,
    every block and the final layer computing their own coefficients from c."""
    tokens, c = model.embed(x, t, y)
    for block in model.blocks:
        v = block.modulation(c)
        for suffix, norm, branch in (("_msa", block.norm1, block.attn), ("_mlp", block.norm2, block.mlp)):
            out = branch(modulate(norm(tokens), v, suffix))
            gate = v.get("gate" + suffix)
            tokens = mp_sum(tokens, out if gate is None else (block.gate_offset + gate) * out,
                            model.config.residual_balance)
    return model.unpatchify(model.final_layer(tokens, c))


@pytest.mark.parametrize("conditioning", ["scale-rotation-gate", "scale-shift-gate", "rotation", "shift-gate"])
@pytest.mark.parametrize("mp", ["all", "mp_residual", "mp_residual,no_layernorm,weight_norm"])
def test_carried_stream_computes_the_direct_mp_sums(conditioning, mp):
    """MPDiT carries the mp_residual stream divided by mp_sum's stream weights (residual_scales); the network is
    the direct form's: forward, and each block called alone."""
    model = perturbed(build_model("DiT-Nano/2", mp=mp, conditioning=conditioning, **SMALL))
    x, t, y = inputs(model.config)
    with torch.no_grad():
        direct = direct_mp_forward(model, x, t, y)
        tolerance = 2e-6 * max(1.0, direct.abs().max().item())  # fp32 rounding, and a LayerNorm's eps
        assert (model(x, t, y) - direct).abs().max() < tolerance
        tokens, c = model.embed(x, t, y)
        for block in model.blocks:
            tokens = block(tokens, c)
        assert (model.unpatchify(model.final_layer(tokens, c)) - direct).abs().max() < tolerance


# --- switches -------------------------------------------------------------------------------

def module_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("switch", MP_SWITCHES)
def test_each_switch_alone_changes_only_its_piece(switch):
    base = build_model("DiT-Nano/2", **SMALL)
    model = build_model("DiT-Nano/2", mp=switch, **SMALL)
    assert model.config.mp == (switch,)
    same_params = model.num_params() == base.num_params()
    if switch == "mp_silu":
        assert MPSiLU in module_types(model) and not {nn.SiLU, nn.GELU} & module_types(model) and same_params
    elif switch == "no_layernorm":
        assert nn.LayerNorm not in module_types(model) and same_params
    elif switch in ("cosine_attention", "mp_residual"):
        assert module_types(model) == module_types(base) and same_params
    elif switch == "weight_norm":
        assert not {nn.Linear, nn.Conv2d} & module_types(model)
        assert all(m.bias is None for m in model.modules() if isinstance(m, MPLinear))
        assert model.x_embedder.proj.weight.shape[1] == SMALL["in_channels"] + 1  # constant-1 channel
    elif switch == "forced_weight_norm":
        assert same_params and MPLinear in module_types(model)
        assert all(not m.traditional for m in model.modules() if isinstance(m, MPLinear))
    elif switch == "mp_pos_embed":
        assert same_params and abs(model.pos_embed.pow(2).mean().sqrt().item() - 1) < 1e-5
    elif switch == "mp_embedding":
        assert hasattr(model.t_embedder, "fourier") and not hasattr(base.t_embedder, "fourier")
    if switch in ("cosine_attention", "mp_residual", "mp_silu", "no_layernorm"):
        # same parameters, different function: with the baseline's weights loaded, outputs differ
        perturbed(base)
        model.load_state_dict(base.state_dict())
        x, t, y = inputs(base.config)
        with torch.no_grad():
            assert not torch.allclose(model.eval()(x, t, y), base(x, t, y), atol=1e-4)


def test_mp_presets_and_unknown_switch():
    assert DiTConfig(mp="all").mp == MP_SWITCHES
    assert DiTConfig(mp="none").mp == ()
    assert DiTConfig(mp="mp_silu,cosine_attention").mp == ("cosine_attention", "mp_silu")
    with pytest.raises(MPDiTError, match="unknown mp switch 'mp_gelu'"):
        DiTConfig(mp="mp_gelu")


# --- parameter counts -----------------------------------------------------------------------

@pytest.mark.parametrize("model,expected", [("DiT-S/2", 32_963_360), ("DiT-S/4", 32_945_024),
                                            ("DiT-B/2", 130_512_416), ("DiT-XL/2", 675_129_632)])
def test_baseline_parameter_counts_equal_dit(model, expected):
    assert count_params(DiTConfig.from_preset(model, input_size=32, in_channels=4, num_classes=1000)) == expected


def test_meta_count_equals_real_count():
    cfg = DiTConfig.from_preset("DiT-Micro/4", input_size=16, mp="all", conditioning="scale-rotation-gate")
    assert count_params(cfg) == MPDiT(cfg).num_params()


def test_scale_rotation_gate_saves_about_five_percent_on_dit_s2():
    counts = {name: count_params(DiTConfig.from_preset("DiT-S/2", input_size=16, mp="all", conditioning=name))
              for name in ("scale-shift-gate", "scale-rotation-gate")}
    saving = 1 - counts["scale-rotation-gate"] / counts["scale-shift-gate"]
    # D^2 per block (12 * 384^2) plus D^2/2 in the final layer's modulation
    assert counts["scale-shift-gate"] - counts["scale-rotation-gate"] == 12 * 384**2 + 384**2 // 2
    assert 0.052 < saving < 0.057


# --- equivalence with DiT ---------------------------------------------------------------------

def reference_dit_forward(sd: dict, cfg: DiTConfig, x, t, y):
    """DiT's forward written from the paper's description against the official key names."""
    p, d, h = cfg.patch_size, cfg.hidden_size, cfg.num_heads
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    tok = tok + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], -1)
    emb = F.linear(F.silu(F.linear(emb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                   sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = F.silu(emb + sd["y_embedder.embedding_table.weight"][y])
    ln = lambda z: F.layer_norm(z, (d,), eps=1e-6)
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        mod = F.linear(c, sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.unsqueeze(1).chunk(6, dim=-1)
        z = ln(tok) * (1 + sc1) + sh1
        n, T, _ = z.shape
        qkv = F.linear(z, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).reshape(n, T, 3, h, d // h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2) / math.sqrt(d // h)).softmax(-1)
        a = (w @ v).transpose(1, 2).reshape(n, T, d)
        tok = tok + g1 * F.linear(a, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        z = ln(tok) * (1 + sc2) + sh2
        z = F.gelu(F.linear(z, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh")
        tok = tok + g2 * F.linear(z, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
    sh, sc = F.linear(c, sd["final_layer.adaLN_modulation.1.weight"],
                      sd["final_layer.adaLN_modulation.1.bias"]).unsqueeze(1).chunk(2, dim=-1)
    out = F.linear(ln(tok) * (1 + sc) + sh, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g, co = cfg.input_size // p, cfg.out_channels
    out = out.reshape(n, g, g, p, p, co).permute(0, 5, 1, 3, 2, 4)  # (n, c, h, p, w, q)
    return out.reshape(n, co, g * p, g * p)


def test_baseline_equals_reference_dit_forward_and_official_layout():
    model = perturbed(build_model("DiT-Nano/2", **SMALL))
    official = to_official(model.state_dict())
    expected_keys = {"x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                     "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "pos_embed",
                     "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias", "blocks.0.mlp.fc1.weight",
                     "blocks.0.mlp.fc2.bias", "blocks.0.adaLN_modulation.1.weight",
                     "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight"}
    assert expected_keys <= set(official)
    assert len(official) == len(model.state_dict())
    x, t, y = inputs(model.config)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), reference_dit_forward(official, model.config, x, t, y), atol=1e-5)


def test_dit_initialization():
    model = build_model("DiT-Nano/2", **SMALL)
    assert all(torch.count_nonzero(b.modulation.proj.weight) == 0 for b in model.blocks)
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.003
    qkv = model.blocks[0].attn.qkv.weight  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert qkv.abs().max() <= math.sqrt(6 / (64 + 192)) and torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert not model.pos_embed.requires_grad


# --- converter ------------------------------------------------------------------------------

def test_converter_loads_official_layout_and_matches_outputs(tmp_path):
    source = perturbed(build_model("DiT-Nano/2", **SMALL))
    official = to_official(source.state_dict())
    target = load_official_state_dict(build_model("DiT-Nano/2", **SMALL), official).eval()
    x, t, y = inputs(source.config)
    with torch.no_grad():
        assert (source(x, t, y) - target(x, t, y)).abs().max() < 1e-6
    assert set(from_official(official)) == set(source.state_dict())
    # from a file, raw or as a training checkpoint with an EMA; the config is inferred from shapes
    torch.save({"model": official, "ema": official}, tmp_path / "ckpt.pt")
    loaded = load_official_checkpoint(tmp_path / "ckpt.pt").eval()
    assert loaded.config.num_classes == 5 and loaded.config.patch_size == 2 and loaded.config.learn_sigma
    with torch.no_grad():
        assert (loaded(x, t, y) - source(x, t, y)).abs().max() < 1e-6


def test_converter_errors_name_the_key(tmp_path):
    official = to_official(build_model("DiT-Nano/2", **SMALL).state_dict())
    missing = dict(official)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(MPDiTError, match=r"missing key 'blocks\.1\.mlp\.fc2\.bias'"):
        load_official_state_dict(build_model("DiT-Nano/2", **SMALL), missing)
    wrong = dict(official)
    wrong["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(MPDiTError, match=r"'blocks\.0\.attn\.qkv\.weight' has shape \(3, 3\)"):
        load_official_state_dict(build_model("DiT-Nano/2", **SMALL), wrong)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MPDiTError, match="corrupt"):
        load_official_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(MPDiTError, match="missing key 'pos_embed'"):
        infer_config({"x_embedder.proj.weight": torch.zeros(64, 2, 2, 2)})


# --- save / load ----------------------------------------------------------------------------

@pytest.mark.parametrize("conditioning", list(CONDITIONINGS))
def test_save_load_round_trip_for_every_variant(tmp_path, conditioning):
    for mp in ("none", "all"):
        model = perturbed(build_model("DiT-Nano/2", mp=mp, conditioning=conditioning, **SMALL))
        model.save_pretrained(tmp_path / mp)
        assert (tmp_path / mp / "config.json").is_file() and (tmp_path / mp / "model.safetensors").is_file()
        x, t, y = inputs(model.config)
        for loaded in (load_model(tmp_path / mp), MPDiT.from_pretrained(tmp_path / mp)):
            assert loaded.config == model.config
            with torch.no_grad():
                assert torch.equal(loaded.eval()(x, t, y), model(x, t, y))


def test_load_model_errors(tmp_path):
    with pytest.raises(MPDiTError, match="no model config"):
        load_model(tmp_path)
    model = build_model("DiT-Nano/2", **SMALL)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MPDiTError, match="corrupt or truncated"):
        load_model(tmp_path)


# --- bad input ------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'DiT-Q/2'"):
        build_model("DiT-Q/2")
    with pytest.raises(ValueError, match="patch size 4 does not divide input size 30"):
        build_model("DiT-Nano/4", input_size=30)
    with pytest.raises(ValueError, match="hidden size must be even"):
        DiTConfig(hidden_size=63, num_heads=3, conditioning="rotation")
    with pytest.raises(ValueError, match="unknown conditioning 'adaln'"):
        DiTConfig(conditioning="adaln")
    model = build_model("DiT-Nano/2", **SMALL)
    x, t, y = inputs(model.config)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 2, 8, 8\), got \(3, 2, 16, 16\)"):
        model(torch.randn(3, 2, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"expected t and y of shape \(3,\)"):
        model(x, t[:2], y)


def test_guided_forward():
    model = perturbed(build_model("DiT-Nano/2", **SMALL))
    x, t, y = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model.guided_forward(x, t, y, 1.0), model(x, t, y))
        null = torch.full_like(y, 5)
        uncond = model.guided_forward(x, t, y, 0.0)
        assert torch.allclose(uncond[:, :2], model(x, t, null)[:, :2], atol=1e-5)
        cond, unc = model(x, t, y), model(x, t, null)
        guided = model.guided_forward(x, t, y, 3.0)
        assert torch.allclose(guided[:, :2], unc[:, :2] + 3 * (cond[:, :2] - unc[:, :2]), atol=1e-4)
        assert torch.allclose(guided[:, 2:], cond[:, 2:], atol=1e-5)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        model.guided_forward(x, t, y, -1.0)


def test_fused_modulate_equals_scale_shift_rotate_in_turn():
    x = torch.randn(3, 7, 16)
    s, b, theta = torch.randn(3, 1, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 8)
    for keys in (["scale"], ["shift"], ["rotation"], ["scale", "rotation"], ["scale", "shift"],
                 ["scale", "shift", "rotation"], ["shift", "rotation"]):
        vectors = {k: v for k, v in (("scale", s), ("shift", b), ("rotation", theta)) if k in keys}
        expected = x
        if "scale" in keys:
            expected = scale(expected, s)
        if "shift" in keys:
            expected = shift(expected, b)
        if "rotation" in keys:
            expected = rotate(expected, theta)
        assert torch.allclose(modulate(x, vectors), expected, atol=1e-5), keys


def test_fused_modulate_has_the_gradients_of_scale_shift_rotate_in_turn():
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
              for shape in ((3, 7, 16), (3, 1, 16), (3, 1, 16), (3, 1, 8))]
    x, s, b, theta = leaves
    for keys in (["rotation"], ["scale", "rotation"], ["scale", "shift", "rotation"]):
        vectors = {k: v for k, v in (("scale", s), ("shift", b), ("rotation", theta)) if k in keys}
        assert torch.autograd.gradcheck(lambda x, *v: modulate(x, dict(zip(vectors, v))), (x, *vectors.values()))
        expected = rotate(shift(scale(x, s), b) if "shift" in keys else scale(x, s) if "scale" in keys else x, theta)
        grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
        inputs = [x, *vectors.values()]
        for got, want in zip(torch.autograd.grad(modulate(x, vectors), inputs, grad),
                             torch.autograd.grad(expected, inputs, grad)):
            assert torch.allclose(got, want, atol=1e-12), keys


def test_a_folded_stream_scale_is_rounded_to_bf16_per_element_not_once():
    """Under bf16 autocast the carried stream's scale (float32, not on bf16's grid) times the modulation is rounded
    per element, so the modulated tensor is not scaled by one rounding error throughout (a bias the gains chase).
    Modulations that vary (here s ~ 0.1 N(0, 1), theta ~ N(0, 1) rad, as trained ones do); the more alike the
    coefficients, the more of the bias is left: at initialization (s = theta = 0) the coefficient is the constant
    itself and rounds once, until the modulation spreads."""
    from mpdit.nn.modulation import apply_modulation, modulation_coefficients

    gen = torch.Generator().manual_seed(0)
    stream_scale = torch.full((1, 1, 1), 0.509)  # bf16 rounds it to 0.5078: -0.23% if rounded once
    x = torch.randn(64, 49, 64, generator=gen).bfloat16()
    s, theta = 0.1 * torch.randn(64, 1, 64, generator=gen).bfloat16(), torch.randn(64, 1, 32, generator=gen).bfloat16()

    def bias(vectors: dict, input_scale: torch.Tensor) -> float:
        coefficients = modulation_coefficients(vectors, input_scale=input_scale)
        assert coefficients[1].dtype == torch.bfloat16
        low = apply_modulation(x, coefficients).double()
        exact = apply_modulation(x.double(), modulation_coefficients({k: v.double() for k, v in vectors.items()},
                                                                     input_scale=stream_scale.double()))
        return ((low * exact).sum() / exact.square().sum() - 1).item()

    for vectors in ({"scale": s}, {"scale": s, "rotation": theta}, {"rotation": theta}):
        assert abs(bias(vectors, stream_scale)) < 5e-4, list(vectors)  # measured: 1e-4 scaled, 4e-4 rotation alone
        assert bias(vectors, stream_scale.bfloat16()) < -2e-3  # the scale rounded once: what the test tells apart


def test_mp_silu_folded_into_fc2_computes_the_same_mlp():
    from mpdit.model.dit import MLP
    cfg = DiTConfig(hidden_size=32, num_heads=2, input_size=8, mp="all")
    mlp = MLP(cfg).eval()
    x = torch.randn(2, 5, 32)
    explicit = F.linear(mp_silu(mlp.fc1(x)), normalize(mlp.fc2.weight) / math.sqrt(128))
    assert torch.allclose(mlp(x), explicit, atol=1e-5)
