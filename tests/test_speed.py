"""Speed machinery: grouped weight normalization equals the per-layer formulas, kernel counts, compile."""

import copy
import json
import math

import pytest
import torch
import torch._dynamo

from mpdit.cli.bench import Bench, peak_memory_mb, resident_bytes
from mpdit.cli.main import main
from mpdit.evaluation.kernels import count_kernels, saved_bytes
from mpdit.diffusion.generate import generate
from mpdit.model import DiTConfig, build_model
from mpdit.model.dit import compile_default
from mpdit.nn.primitives import (EPS, GroupedWeightNorm, MPEmbedding, MPLinear, WeightNormBank, force_normalize_,
                                 normalize)
from mpdit.training.train import make_optimizer


def reference_weight(w: torch.Tensor, scale: float, gain: torch.Tensor) -> torch.Tensor:
    """EDM2 eq. 66 written plainly, differentiated by autograd: normalize(w) * scale * gain per row."""
    return normalize(w) * scale * gain[:, None]


def test_grouped_weight_norm_equals_autograd_through_the_formula():
    torch.manual_seed(0)
    weights = [torch.randn(rows, 24, requires_grad=True) for rows in (5, 3, 8)]
    gains = [torch.randn(rows, requires_grad=True) for rows in (5, 3, 8)]
    scale = 0.7 / math.sqrt(24)
    grad = torch.randn(16, 24)

    expected = torch.cat([reference_weight(w, scale, g) for w, g in zip(weights, gains)])
    expected_grads = torch.autograd.grad(expected, weights + gains, grad)
    out = GroupedWeightNorm.apply(scale * torch.cat(gains)[:, None], torch.float32, None, None, *weights)
    grads = torch.autograd.grad(out, weights + gains, grad)
    assert torch.allclose(out, expected, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # under bf16 autocast: W written in bf16 as it is computed, the gradients those of the formula for the bf16 G
    row_scale = scale * torch.cat(gains)[:, None]
    out_bf16 = GroupedWeightNorm.apply(row_scale, torch.bfloat16, None, None, *weights)
    assert out_bf16.dtype == torch.bfloat16 and torch.equal(out_bf16, out.detach().to(torch.bfloat16))
    grad_bf16 = grad.to(torch.bfloat16)
    expected = torch.cat([reference_weight(w, scale, g) for w, g in zip(weights, gains)])
    for got, want in zip(torch.autograd.grad(out_bf16, weights + gains, grad_bf16),
                         torch.autograd.grad(expected, weights + gains, grad_bf16.float())):
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # the weights handed in already stacked (forced normalization's scratch copy): the same W
    stacked = torch.cat([w.detach() for w in weights])
    assert torch.equal(GroupedWeightNorm.apply(row_scale, torch.float32, stacked, None, *weights), out)
    # the gradient of each row is orthogonal to the row (EDM2's reason for the traditional normalization),
    # up to eps: cos(g, w) = O(eps / rms)
    for w, g in zip(weights, grads[:3]):
        assert (torch.cosine_similarity(g, w, dim=1).abs() < 10 * EPS).all()


@pytest.mark.parametrize("dim", [-1, (1, 2)])
def test_normalize_backward_equals_autograd_through_the_formula(dim):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, requires_grad=True)
    grad = torch.randn(3, 4, 8)
    n = 8 if dim == -1 else 32
    plain = x / (EPS + torch.linalg.vector_norm(x, dim=dim, keepdim=True) / math.sqrt(n))
    out = normalize(x, dim=dim)
    assert torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(plain, x, grad)[0], atol=1e-6)


@pytest.mark.parametrize("rows", [(4, 6), (5,)])
def test_grouped_forced_normalization_equals_per_layer_normalize(rows):
    torch.manual_seed(0)
    weights = [torch.randn(r, 3, 2, 2) * 5 for r in rows]
    expected = [normalize(w) / math.sqrt(12) for w in weights]
    forced = force_normalize_(weights, 1 / math.sqrt(12))
    assert all(torch.allclose(w, e, atol=1e-7) for w, e in zip(weights, expected))
    # what it hands the traditional normalization: the new rows' RMS (computed, not measured), and their stack
    new = torch.cat([w.flatten(1) for w in weights])
    assert torch.allclose(forced.rms, new.square().mean(dim=1, keepdim=True).sqrt(), rtol=1e-6, atol=0)
    assert forced.stacked is None if len(rows) == 1 else torch.equal(forced.stacked, new)
    measured = GroupedWeightNorm.apply(torch.ones(new.shape[0], 1), torch.float32, None, None, *weights)
    handed = GroupedWeightNorm.apply(torch.ones(new.shape[0], 1), torch.float32, forced.stacked, forced.rms, *weights)
    assert torch.allclose(handed, measured, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stack", [True, False])
def test_model_forward_equals_each_layer_alone(stack):
    """The bank computes every layer's weight together; each layer computing its own gives the same network."""
    torch.manual_seed(0)
    model = build_model("DiT-Nano/2", input_size=8, in_channels=2, num_classes=5, mp="all",
                        conditioning="scale-rotation-gate")
    model.stack_weights = stack
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 5])
    model.eval()  # with gradients, but no forced normalization between the two computations
    out = model(x, t, y)
    tokens, c = model.embed(x, t, y)  # outside forward: no prepared weights, every layer computes its own
    for block in model.blocks:
        tokens = block(tokens, c)
    alone = model.unpatchify(model.final_layer(tokens, c))
    assert torch.allclose(out, alone, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("stack", [True, False])
def test_training_forward_applies_forced_normalization_to_every_weight_once(stack):
    torch.manual_seed(0)
    layers = [MPLinear(16, 8), MPLinear(16, 4, learned_gain=0.5), MPLinear(32, 8)]
    bank = WeightNormBank(layers)
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(3.0)
    before = [layer.weight.clone() for layer in layers]
    bank.prepare(torch.float32, training=True, stack=stack)
    for layer, w in zip(layers, before):
        assert torch.allclose(layer.weight, normalize(w), atol=1e-7)
        rms = layer.weight.pow(2).mean(dim=1).sqrt()
        expected = normalize(layer.weight) / math.sqrt(layer.fan_in) * (1 if layer.gain is None else layer.gain)
        assert torch.allclose(layer.current_weight, expected, atol=1e-7) and (rms - 1).abs().max() < 1e-3
    bank.release()
    assert all(layer.current_weight is None for layer in layers)


def test_a_span_is_one_piece_of_its_group_with_no_zero_gradients_for_its_layers():
    torch.manual_seed(0)
    layers = [MPLinear(16, 8), MPLinear(16, 4, learned_gain=0.5), MPLinear(16, 6, learned_gain=0.5)]
    bank = WeightNormBank(layers, spans=[layers[1:]])
    bank.prepare(torch.float32, training=False, stack=True)
    span = bank.span(layers[1:])
    assert torch.equal(span, torch.cat([layers[1].current_weight, layers[2].current_weight]))
    # the model's use: the span as one matrix, its layers' own weights unused
    counter = count_kernels(lambda: (span.square().sum() + layers[0].current_weight.sum()).backward())
    assert "zeros" not in counter.counts and "slice_backward" not in counter.counts
    assert all(layer.weight.grad.any() for layer in layers)
    assert torch.equal(bank.span(layers[:1]), layers[0].current_weight)  # a single layer is its own span
    bank.release()
    assert bank.span(layers[1:]) is None
    with pytest.raises(ValueError, match="consecutive layers of one fan-in group"):
        WeightNormBank(layers, spans=[[layers[0], layers[2]]])


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("mp", ["all", "forced_weight_norm"])
def test_a_training_forward_normalizes_each_forced_weight_exactly_once(mp, stack):
    model = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=3, mp=mp)
    model.stack_weights = stack
    layers = [m for m in model.modules() if isinstance(m, (MPLinear, MPEmbedding)) and m.forced]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(2.0)
    expected = [normalize(layer.weight) * layer.forced_scale for layer in layers]
    model(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2]))
    assert layers and all(torch.allclose(layer.weight, e, atol=1e-7) for layer, e in zip(layers, expected))


@pytest.mark.parametrize("stack", [True, False])
def test_eval_cache_follows_weights_written_in_place_or_replaced(stack):
    model = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=3, mp="all",
                        conditioning="scale-shift-gate").eval()
    model.stack_weights = stack
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        first = model(x, t, y)
        assert torch.equal(model(x, t, y), first)  # cached weights, same output
        model.final_layer.linear.gain.mul_(2)  # in place
        second = model(x, t, y)
        assert not torch.allclose(second, first)
        model.final_layer.linear.gain.data = model.final_layer.linear.gain.data / 2  # replaced
        assert torch.allclose(model(x, t, y), first, atol=1e-6)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["final_layer.linear.gain"] = state["final_layer.linear.gain"] * 2
        model.load_state_dict(state, assign=True)  # new parameter objects
        assert torch.allclose(model(x, t, y), second, atol=1e-6)


@pytest.mark.parametrize("mp,conditioning", [("all", "scale-rotation-gate"), ("none", "adaln-zero")])
def test_stacked_and_per_layer_paths_train_the_same_network(mp, conditioning):
    """The GPU path (weights stacked per fan-in group, projections in one matmul) and the CPU path (each layer
    alone) agree step for step."""
    runs = []
    for stack in (True, False):
        torch.manual_seed(0)
        model = build_model("DiT-Nano/2", input_size=8, in_channels=2, num_classes=5, mp=mp,
                            conditioning=conditioning)
        model.stack_weights = stack
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        x, t, y = torch.randn(4, 2, 8, 8, generator=gen), torch.tensor([1, 90, 500, 999]), torch.tensor([0, 1, 4, 5])
        losses = []
        for _ in range(3):
            loss = model(x, t, y).square().mean() + sum(p.square().sum() for p in model.parameters() if p.ndim == 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert all(torch.allclose(state_a[k], state_b[k], atol=1e-4) for k in state_a)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_training_on_the_stacked_path_trains_the_eager_weights(precision):
    """CUDA's default (compiled, weights stacked) checked on the CPU: forced normalization writes parameters and
    traditional normalization reuses its stacked output inside the compiled graph."""
    torch.manual_seed(0)
    base = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=3, mp="all",
                       conditioning="scale-rotation-gate")
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([3, 700, 10, 500]), torch.tensor([0, 2, 1, 1])
    weights = []
    for compiled in (False, True):
        model = copy.deepcopy(base).train()
        model.stack_weights = True
        optimizer = make_optimizer(model.parameters(), lr=1e-2)
        forward = torch.compile(model) if compiled else model
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = forward(x, t, y).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*weights))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], base.parameters()))  # it trained


def test_kernel_counts_are_deterministic_and_within_the_targets():
    """DiT-S/2 on 16x16x4 latents (issue 10's setting): the MP training step launches at most 1.5x the
    baseline's kernels and scale-shift-gate no more than scale-rotation-gate. Sampling misses its 1.2x
    target (docs/performance.md); the bound here guards against regressions."""
    counts = {}
    for mp, conditioning in [("none", "adaln-zero"), ("all", "scale-shift-gate"), ("all", "scale-rotation-gate")]:
        config = DiTConfig.from_preset("DiT-S/2", mp=mp, conditioning=conditioning, input_size=16)
        bench = Bench(config, 2, torch.device("cpu"), "fp32", compile_model=False)
        train, sample = bench.kernels()
        counts[conditioning] = (train.total, sample.total)
        again = bench.kernels()
        assert (again[0].total, again[1].total) == counts[conditioning]  # deterministic
        assert (again[0].total_bytes, again[1].total_bytes) == (train.total_bytes, sample.total_bytes)
    (base_train, base_sample), ssg, srg = counts.values()
    assert srg[0] <= 1.5 * base_train and ssg[0] <= srg[0]
    assert srg[1] <= 2.0 * base_sample and ssg[1] <= srg[1]


def test_bench_command_reports_kernel_counts_and_ratios(capsys):
    assert main(["bench", "--model", "DiT-Nano/4", "--input-size", "8", "--in-channels", "1", "--num-classes", "3",
                 "--batch", "2", "--repeats", "1", "--warmup", "0", "--count-ops", "--loop", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["conditioning"] for r in rows] == ["adaln-zero", "scale-shift-gate", "scale-rotation-gate"]
    for row in rows:
        assert row["train_kernels"] > row["sample_kernels"] > 0
        assert row["train_kernels_ratio"] == round(row["train_kernels"] / rows[0]["train_kernels"], 3)
        assert row["train_moved_mb"] > row["sample_moved_mb"] > 0
        assert row["sample_moved_ratio"] == round(row["sample_moved_mb"] / rows[0]["sample_moved_mb"], 3)
        assert row["saved_mb"] > 0 and row["saved_ratio"] == round(row["saved_mb"] / rows[0]["saved_mb"], 3)
        assert row["loop_ms"] > 0 and row["loop_over_step"] == round(row["loop_ms"] / row["train_ms"], 3)
        assert 0 < row["batch_ms"] < row["loop_ms"]  # the host's batch assembly is a part of the loop's step
    assert main(["bench", "--model", "DiT-Nano/4", "--input-size", "8", "--in-channels", "1", "--num-classes", "3",
                 "--batch", "2", "--repeats", "1", "--warmup", "0", "--count-ops"]) == 0
    assert "train kernels" in capsys.readouterr().out


def test_bench_memory_is_the_variant_resident_state_plus_its_step():
    bench = Bench(DiTConfig.from_preset("DiT-Nano/4", mp="all", conditioning="scale-rotation-gate", input_size=8,
                                        num_classes=10), 2, torch.device("cpu"), "fp32", compile_model=False)
    weights = sum(p.numel() * p.element_size() for p in bench.model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in bench.model.parameters() if p.requires_grad)
    before_step = resident_bytes(bench)
    assert before_step >= 2 * weights  # the model and its EMA shadow
    bench.train_step()
    resident = resident_bytes(bench)
    assert 2 * trainable <= resident - before_step <= 2 * trainable + 8 * len(bench.optimizer.state)  # AdamW's moments
    assert peak_memory_mb(bench) * 2**20 >= resident + trainable  # the step allocates at least the gradients


def test_saved_bytes_counts_activations_once_and_not_parameters():
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)
    # linear saves x (and its weight, excluded); tanh saves its output; x is counted once although saved twice
    assert saved_bytes(lambda: torch.tanh(layer(x) * x), layer.parameters()) == 3 * 4 * 16 * 4


def test_counter_adds_up_the_bytes_each_kernel_reads_and_writes():
    x, bias, y = torch.randn(4, 8), torch.randn(8), torch.randn(4, 8)
    counter = count_kernels(lambda: x + bias)
    assert counter.bytes_by_op["add"] == (32 + 8 + 32) * 4  # two inputs read, the output written
    assert count_kernels(lambda: y.mul_(2.0)).total_bytes == 2 * 32 * 4  # in place: read and written
    out = torch.empty(4, 8, dtype=torch.bfloat16)
    assert count_kernels(lambda: torch.mul(x, 2.0, out=out)).total_bytes == 32 * 4 + 32 * 2  # out=: written only
    assert count_kernels(lambda: x.expand(3, 4, 8) * 1.0).total_bytes == (32 + 96) * 4  # a broadcast read once
    assert count_kernels(lambda: x.t().contiguous().view(32)).total_bytes == 2 * 32 * 4  # views move nothing


def test_counter_sees_backward_and_skips_views():
    x = torch.randn(4, 4, requires_grad=True)
    counter = count_kernels(lambda: (x.t().reshape(16).view(4, 4) * 2).sum().backward())
    assert counter.counts["mul"] >= 2  # forward and backward
    assert not {"t", "view", "transpose"} & set(counter.counts)


@pytest.mark.parametrize("conditioning,mp", [("adaln-zero", "none"), ("scale-shift-gate", "all"),
                                             ("scale-rotation-gate", "all")])
def test_compile_traces_train_and_eval_without_graph_breaks(conditioning, mp):
    model = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=3, mp=mp, conditioning=conditioning)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    assert torch._dynamo.explain(model.train())(x, t, y).graph_break_count == 0
    with torch.no_grad():
        assert torch._dynamo.explain(model.eval())(x, t, y).graph_break_count == 0


def test_compile_is_on_by_default_on_cuda_only():
    assert compile_default(None, torch.device("cuda")) and not compile_default(None, torch.device("cpu"))
    assert compile_default(True, torch.device("cpu")) and not compile_default(False, torch.device("cuda"))


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_images():
    model = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=3, mp="all",
                        conditioning="scale-rotation-gate")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    labels = torch.tensor([0, 1, 2, 3])
    eager = generate(model, labels, steps=4, cfg_scale=2.0, compile_model=False)
    compiled = generate(model, labels, steps=4, cfg_scale=2.0, compile_model=True)
    assert (eager.int() - compiled.int()).abs().max() <= 1  # uint8 images; rounding may move a pixel by one


@pytest.mark.slow
def test_bench_counts_the_kernels_inductor_generates_for_compiled_steps():
    config = DiTConfig.from_preset("DiT-Nano/4", mp="all", conditioning="scale-rotation-gate", input_size=8,
                                   in_channels=1, num_classes=3)
    bench = Bench(config, 2, torch.device("cpu"), "fp32", compile_model=True)
    train, sample = bench.compiled_kernels()
    eager_train, eager_sample = bench.kernels()
    assert 0 < sample < train  # the backward graph's kernels come on top of a forward's
    assert train < eager_train.total and sample < eager_sample.total  # fused: fewer than the eager launches
    uncompiled_train, uncompiled_sample = Bench(config, 2, torch.device("cpu"), "fp32", compile_model=False).kernels()
    assert (eager_train.total, eager_sample.total) == (uncompiled_train.total, uncompiled_sample.total)
