"""Objectives (DDPM, flow matching): formulas, samplers on a known velocity field, training on a toy mixture,
the DDPM objective's unchanged model inputs, DyT, the validation loss, and the flow / DyT commands end to end."""

import json
import math

import pytest
import torch
from torch import nn

from mpdit.cli.main import main
from mpdit.data.datasets import ImageDataset, load_dataset, split_holdout
from mpdit.diffusion import flow
from mpdit.diffusion.objectives import (VALIDATION_LEVELS, DDPMObjective, FlowObjective, ObjectiveConfig,
                                        check_time_shift, make_objective)
from mpdit.diffusion.schedule import noise_conditioning
from mpdit.errors import MPDiTError
from mpdit.model.config import DiTConfig
from mpdit.model.dit import MPDiT, count_params
from mpdit.nn.dyt import DynamicTanh
from mpdit.training import checkpoint as ckpt
from mpdit.training.train import TrainConfig, Trainer, model_config_for_data
from mpdit.training.validation import validation_loss

TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=64, depth=2, num_heads=2, num_classes=3)


def flow_objective(mp="none", **model) -> FlowObjective:
    config = DiTConfig(**{**TINY, "mp": mp, "learn_sigma": False, **model})
    return make_objective(ObjectiveConfig("flow", sigma_data=0.5), config)


# ----------------------------------------------------------------------------- formulas


def test_path_target_and_time_shift_formulas():
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = flow.interpolate(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[3], noise[3])  # t = 0 data, t = 1 noise
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(flow.velocity(x0, noise), noise - x0)
    # d x_t / dt is the velocity target
    h = 1e-3
    derivative = (flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t)) / h
    assert torch.allclose(derivative, noise - x0, atol=1e-2)
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(flow.shift_times(s, 3.0), torch.tensor([0.0, 0.75, 1.0]))  # 3 * 0.5 / (1 + 2 * 0.5)
    grid = flow.time_grid(4, 3.0)
    assert grid[0] == 1 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all()) and len(grid) == 5


def test_t_zero_and_one_give_finite_model_inputs():
    t = torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-9, 1.0])
    c_noise = flow.log_sigma_input(t)
    assert bool(torch.isfinite(c_noise).all()) and c_noise[2] == 0  # sigma = 1 at t = 1/2
    assert c_noise[0] == pytest.approx(math.log(1e-2) / 4, rel=1e-5) and c_noise[-1] == pytest.approx(math.log(1e2) / 4,
                                                                                                         rel=1e-5)
    assert c_noise[3] == c_noise[-1]  # t = 1 - 1e-9 and t = 1 meet the clamp
    c_in = flow.input_scale(t, 0.5)
    assert bool(torch.isfinite(c_in).all()) and c_in[0] == pytest.approx(2.0) and c_in[-1] == pytest.approx(1.0)
    # c_in brings x_t of data with RMS sigma_data to unit RMS
    gen = torch.Generator().manual_seed(0)
    x0, noise = 0.5 * torch.randn(20000, generator=gen), torch.randn(20000, generator=gen)
    for level in (0.2, 0.5, 0.8):
        x_t = (1 - level) * x0 + level * noise
        assert (x_t * flow.input_scale(torch.tensor([level]), 0.5)).square().mean().sqrt() == pytest.approx(1, abs=0.02)
    mp = flow_objective("all", conditioning="scale-rotation-gate")
    model = MPDiT(mp.model_config).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        out = mp.denoiser(lambda x_in, s: model(x_in, s, torch.zeros(5, dtype=torch.long)))(x, t)
    assert bool(torch.isfinite(out).all())


def test_perfect_velocity_predictor_has_zero_loss():
    objective = flow_objective()
    x0, noise = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    t = torch.rand(6)
    losses = objective.training_losses(lambda x_in, s: noise - x0, x0, t, noise)
    assert torch.equal(losses["loss"], torch.zeros(6)) and torch.equal(losses["vb"], torch.zeros(6))
    assert bool((objective.training_losses(lambda x_in, s: noise, x0, t, noise)["mse"] > 0).all())


def gaussian_velocity(mu: float, s: float):
    """The exact velocity field of the linear path from data N(mu, s^2) (E[eps - x0 | x_t = x])."""

    def v(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1))).double()
        var = (1 - t) ** 2 * s**2 + t**2
        return ((t - (1 - t) * s**2) / var * (x.double() - (1 - t) * mu) - mu).to(x.dtype)

    return v


def transport_errors(sampler, steps: int, mu: float = 1.5, s: float = 0.4) -> float:
    """The sampler's map x_1 -> x_0 is affine for a Gaussian target: its error in mean and std."""
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    out = sampler(gaussian_velocity(mu, s), x, flow.time_grid(steps))
    mean, std = out[0, 0].item(), (out[1, 0] - out[0, 0]).item()
    return abs(mean - mu) + abs(std - s)


def test_euler_and_heun_transport_the_normal_to_a_gaussian_with_their_order():
    euler = [transport_errors(flow.euler_sample, n) for n in (16, 32, 64)]
    heun = [transport_errors(flow.heun_sample, n) for n in (16, 32, 64)]
    assert heun[-1] < 2e-3 and euler[-1] < 2e-2  # the stated errors at 64 steps
    for errors, ratio in ((euler, (0.4, 0.6)), (heun, (0.15, 0.35))):  # first order halves, second quarters
        for coarse, fine in zip(errors, errors[1:]):
            assert ratio[0] < fine / coarse < ratio[1], errors


def test_euler_maruyama_transports_the_normal_to_a_gaussian():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, generator=gen, dtype=torch.float64)
    out = flow.euler_maruyama_sample(gaussian_velocity(1.5, 0.4), x, flow.time_grid(200), generator=gen)
    assert out.mean().item() == pytest.approx(1.5, abs=0.02) and out.std().item() == pytest.approx(0.4, abs=0.02)


class ToyVelocity(nn.Module):
    """An MLP velocity for 2-D points stored as (N, 2, 1, 1) images; time input 1000 t."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, time_input):
        return self.net(torch.cat([x.flatten(1), time_input[:, None] / 1000], 1)).view_as(x)


def test_training_on_a_toy_mixture_moves_samples_to_the_data():
    torch.manual_seed(0)
    config = DiTConfig(input_size=1, patch_size=1, in_channels=2, hidden_size=64, depth=1, num_heads=1,
                       num_classes=1, learn_sigma=False)
    objective = make_objective(ObjectiveConfig("flow", time_sampling="uniform"), config)
    net = ToyVelocity()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def data(n):  # two Gaussians at (-2, 0) and (2, 0), std 0.3: mean 0, variances 4.09 and 0.09
        side = torch.randint(0, 2, (n,), generator=gen) * 4.0 - 2
        return (torch.stack([side, torch.zeros(n)], 1) + 0.3 * torch.randn(n, 2, generator=gen)).view(n, 2, 1, 1)

    for _ in range(600):
        x0 = data(256)
        loss = objective.training_losses(net, x0, objective.draw_times(256, gen), torch.randn(x0.shape, generator=gen))
        optimizer.zero_grad()
        loss["loss"].mean().backward()
        optimizer.step()
    with torch.no_grad():
        out = objective.sample(net, (2000, 2, 1, 1), sampler="heun", steps=20, generator=gen).flatten(1)
    assert out.mean(0).abs().max() < 0.3
    assert 3.0 < out[:, 0].var() < 5.0 and out[:, 1].var() < 0.4  # from 1 and 1 at the start


def test_time_sampling_draws_and_options():
    gen = torch.Generator().manual_seed(0)
    uniform = flow.draw_times(20000, gen, "uniform")
    assert 0 <= uniform.min() and uniform.max() < 1 and uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    logit = flow.draw_times(20000, gen, "logit-normal", 1.0, 0.5)
    z = torch.log(logit / (1 - logit))
    assert z.mean().item() == pytest.approx(1.0, abs=0.02) and z.std().item() == pytest.approx(0.5, abs=0.02)
    for bad, match in ((dict(objective="score"), "unknown objective"), (dict(time_sampling="beta"), "time sampling"),
                       (dict(logit_std=0.0), "std must be"), (dict(logit_mean=math.nan), "mean must be"),
                       (dict(logit_std=math.inf), "std must be"), (dict(sigma_data=-1.0), "sigma_data")):
        with pytest.raises(MPDiTError, match=match):
            ObjectiveConfig(**bad)
    for shift in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(MPDiTError, match="--time-shift must be a finite number > 0"):
            check_time_shift(shift)


# ----------------------------------------------------------------------------- the model's inputs


def test_ddpm_objective_keeps_the_model_inputs_of_before():
    """DiT sees the integer step itself, MP EDM2's ln(sigma_t)/4 from the DDPM schedule, raw the step as a float."""
    t = torch.tensor([0, 17, 500, 999])
    dit = make_objective(None, DiTConfig(**TINY))
    assert torch.equal(dit.time_input(t), t) and dit.model_input(x := torch.randn(4, 1, 8, 8), t) is x
    mp = make_objective(None, DiTConfig(**TINY, mp="all", conditioning="scale-rotation-gate"))
    assert torch.equal(mp.time_input(t), noise_conditioning(1000)[t])
    between = mp.time_input(torch.tensor([17.25])).item()
    assert between == pytest.approx(0.75 * noise_conditioning(1000)[17] + 0.25 * noise_conditioning(1000)[18])
    raw = make_objective(None, DiTConfig(**TINY, mp="all", timestep_input="raw"))
    assert torch.equal(raw.time_input(t), t.float())
    assert isinstance(dit, DDPMObjective) and dit.learn_sigma and not FlowObjective.learn_sigma


def test_flow_objective_model_inputs_and_refusals():
    dit = flow_objective()
    t = torch.tensor([0.0, 0.3, 1.0])
    assert torch.allclose(dit.time_input(t), 1000 * t)  # the timesteps of diffusers' flow schedulers
    x = torch.randn(3, 1, 8, 8)
    assert dit.model_input(x, t) is x  # DiT models see x_t as SiT's do
    mp = flow_objective("all", conditioning="scale-rotation-gate")
    assert torch.equal(mp.time_input(t), flow.log_sigma_input(t))
    assert torch.allclose(mp.model_input(x, t), x * flow.input_scale(t, 0.5).view(3, 1, 1, 1))
    with pytest.raises(MPDiTError, match="predicts the velocity alone"):
        make_objective(ObjectiveConfig("flow"), DiTConfig(**TINY))
    with pytest.raises(MPDiTError, match="timestep-input raw"):
        flow_objective("all", timestep_input="raw")
    with pytest.raises(MPDiTError, match="needs sigma_data"):
        make_objective(ObjectiveConfig("flow"), DiTConfig(**TINY, mp="all", learn_sigma=False))
    with pytest.raises(MPDiTError, match="Min-SNR"):
        dit.training_losses(lambda x_in, s: x_in, x, t, x, min_snr_gamma=5)
    with pytest.raises(MPDiTError, match=r"unknown sampler 'ddim' for a flow model \('ddim' is a sampler of another "
                                         r"objective\): choose heun, euler, euler-maruyama"):
        dit.check_sampler("ddim")
    with pytest.raises(MPDiTError, match="choose ddim, ddpm"):
        make_objective(None, DiTConfig(**TINY)).check_sampler("heun")
    with pytest.raises(MPDiTError, match="--time-shift shifts a flow model's"):
        make_objective(None, DiTConfig(**TINY)).sample(None, (1, 1, 8, 8), sampler="ddim", steps=2,
                                                       generator=torch.Generator(), time_shift=2.0)
    with pytest.raises(MPDiTError, match="flow samplers take a step count"):
        dit.sample(None, (1, 1, 8, 8), sampler="euler", steps="ddim10", generator=torch.Generator())


def test_heun_costs_two_calls_a_step_but_the_last():
    objective = flow_objective()
    calls = []
    objective.sample(lambda x_in, s: calls.append(1) or torch.zeros_like(x_in), (2, 1, 8, 8), sampler="heun",
                     steps=25, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 49  # as many as DDIM's 50 steps, less one


# ----------------------------------------------------------------------------- DyT


def test_dyt_replaces_each_layernorm_by_tanh_of_alpha_x():
    torch.manual_seed(0)
    layernorm = MPDiT(DiTConfig(**TINY, zero_init=False))
    torch.manual_seed(0)
    dyt = MPDiT(DiTConfig(**TINY, norm="dyt"))
    assert not dyt.config.zero_init and DiTConfig(**TINY).zero_init  # DyT's recipe: no zero init by default
    norms = [m for m in dyt.modules() if isinstance(m, DynamicTanh)]
    assert len(norms) == 2 * TINY["depth"] + 1 and all(m.alpha.item() == 0.5 for m in norms)
    state = dyt.state_dict()
    assert all(torch.equal(state[k], v) for k, v in layernorm.state_dict().items())  # the same init otherwise
    for module in list(layernorm.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.LayerNorm):
                setattr(module, name, DynamicTanh())
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 3])
    assert torch.equal(dyt(x, t, y), layernorm(x, t, y))
    dyt(x, t, y).square().mean().backward()
    assert all(m.alpha.grad is not None and m.alpha.grad != 0 for m in norms)  # gradients reach alpha
    assert count_params(dyt.config) == count_params(DiTConfig(**TINY)) + 2 * TINY["depth"] + 1


def test_dyt_and_zero_init_refusals():
    with pytest.raises(MPDiTError, match="no_layernorm switch"):
        DiTConfig(**TINY, mp="all", norm="dyt")
    with pytest.raises(MPDiTError, match="unknown norm 'rms'"):
        DiTConfig(**TINY, norm="rms")
    with pytest.raises(MPDiTError, match="zero_init off applies to DiT's plain linear layers"):
        DiTConfig(**TINY, mp="weight_norm", zero_init=False)
    assert DiTConfig(**TINY, mp="cosine_attention", norm="dyt").norm == "dyt"  # a switch that keeps LayerNorms
    assert DiTConfig(**TINY, mp="weight_norm", norm="dyt").zero_init  # weight-normalized layers keep a zero gain


@pytest.mark.slow
def test_dyt_model_compiles_without_graph_breaks():
    model = MPDiT(DiTConfig(**TINY, norm="dyt"))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 1])
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0


# ----------------------------------------------------------------------------- validation loss, holdout


def test_validation_loss_is_deterministic_and_per_level(tiny_idx):
    data = load_dataset(tiny_idx, "test")
    for objective in (make_objective(None, DiTConfig(**{**TINY, "num_classes": 10, "input_size": 28})),
                      flow_objective(input_size=28, num_classes=10)):
        torch.manual_seed(0)
        model = MPDiT(objective.model_config)
        first = validation_loss(model, objective, data, num=40, batch_size=16)
        assert first == validation_loss(model, objective, data, num=40, batch_size=16)
        assert len(first["per_level"]) == VALIDATION_LEVELS and first["num_images"] == 40
        assert first["val_loss"] == pytest.approx(sum(first["per_level"]) / VALIDATION_LEVELS)
        assert first != validation_loss(model, objective, data, num=40, batch_size=16, seed=1)


def test_holdout_is_a_fixed_disjoint_share():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    data = ImageDataset(images, torch.zeros(100), 1)
    kept, held = split_holdout(data, 0.1)
    assert len(held) == 10 and len(kept) == 90
    assert set(held.images.flatten().tolist()).isdisjoint(kept.images.flatten().tolist())
    assert torch.equal(split_holdout(data, 0.1)[1].images, held.images)
    with pytest.raises(MPDiTError, match="in \\(0, 1\\)"):
        split_holdout(data, 1.0)


# ----------------------------------------------------------------------------- training and commands


def train_configs(data, objective="flow", norm="layernorm", mp="none", **options):
    dataset = load_dataset(data, "train")
    model_cfg = model_config_for_data("DiT-Nano/4", dataset, mp=mp, norm=norm, learn_sigma=objective == "ddpm",
                                      conditioning="adaln-zero" if mp == "none" else "scale-rotation-gate")
    cfg = TrainConfig(data=data, objective=objective, steps=4, batch_size=16, lr=1e-3, schedule="constant",
                      warmup_steps=0, ckpt_every=2, log_every=1, telemetry_every=0, progress=False, device="cpu",
                      **options)
    return model_cfg, cfg


@pytest.mark.parametrize("mp,norm", [("all", "layernorm"), ("none", "dyt")])
def test_flow_and_dyt_runs_resume_bit_identically(tmp_path, tiny_idx, mp, norm):
    model_cfg, cfg = train_configs(tiny_idx, mp=mp, norm=norm)
    Trainer(tmp_path / "straight", model_cfg, cfg).run()
    half = TrainConfig(**{**cfg.__dict__, "steps": 2})
    Trainer(tmp_path / "broken", model_cfg, half).run()
    resumed_cfg = TrainConfig.from_dict(json.loads((tmp_path / "broken/train_config.json").read_text()))
    resumed_cfg.steps = 4
    Trainer(tmp_path / "broken", model_cfg, resumed_cfg, resume=True).run()
    a = ckpt.load_safetensors(tmp_path / "straight/checkpoints/step-0000004/model.safetensors")
    b = ckpt.load_safetensors(tmp_path / "broken/checkpoints/step-0000004/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = json.loads((tmp_path / "straight/checkpoints/step-0000004/objective.json").read_text())
    assert recorded["objective"] == "flow" and (recorded["sigma_data"] is not None) == (mp == "all")


def test_flow_dyt_commands_end_to_end(tmp_path, tiny_idx, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "DiT-Nano/4", "--data", tiny_idx, "--objective", "flow", "--mp", "none",
                 "--conditioning", "adaln-zero", "--norm", "dyt", "--steps", "2", "--batch-size", "16",
                 "--ckpt-every", "2", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--num", "4", "--steps", "3", "--out", str(tmp_path / "s.png"),
                 "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sampler"] == "heun" and report["objective"] == "flow"  # the flow default
    assert main(["eval", "--ckpt", str(run), "--num", "10", "--steps", "2", "--sampler", "euler", "--json",
                 "--no-baseline"]) == 0
    assert json.loads(capsys.readouterr().out)["protocol"]["objective"] == "flow"
    assert main(["eval", "--ckpt", str(run), "--loss", "--num", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["val_loss"] > 0 and "fd_classifier" in result["metrics"]  # merged with the eval
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    info = json.loads((tmp_path / "export/mpdit.json").read_text())
    scheduler = json.loads((tmp_path / "export/scheduler/scheduler_config.json").read_text())
    assert info["objective"]["objective"] == "flow" and scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert "Training objective: **flow**" in (tmp_path / "export/README.md").read_text()
    loaded = MPDiT.from_pretrained(tmp_path / "export")
    assert loaded.config.norm == "dyt" and not loaded.config.learn_sigma
    # the exported folder samples with its objective too
    assert main(["sample", "--ckpt", str(tmp_path / "export"), "--num", "2", "--steps", "2", "--weights", "raw",
                 "--out", str(tmp_path / "e.png"), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["objective"] == "flow"


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_objective_and_dyt_input_is_one_line_and_writes_nothing(tmp_path, tiny_idx, capsys):
    run = tmp_path / "run"
    base = ["train", "--model", "DiT-Nano/4", "--data", tiny_idx, "--steps", "2", "--batch-size", "16",
            "--no-progress", "--out", str(run)]
    for extra, fragment in ((["--objective", "flow", "--logit-std", "0"], "std must be a finite number > 0"),
                            (["--objective", "flow", "--logit-std", "-1"], "std must be a finite number > 0"),
                            (["--norm", "dyt"], "no_layernorm switch"),
                            (["--objective", "flow", "--min-snr-gamma", "5"], "Min-SNR"),
                            (["--objective", "flow", "--timestep-input", "raw"], "timestep-input raw")):
        assert main(base + extra) == 2
        assert fragment in error_line(capsys)
        assert not run.exists() or not any(run.rglob("*.safetensors"))
    for extra in (["--objective", "score"], ["--logit-mean", "nan"], ["--holdout", "inf"], ["--norm", "rms"]):
        with pytest.raises(SystemExit) as stop:  # argparse's own check: one line, exit 2
            main(base + extra)
        assert stop.value.code == 2 and extra[0] in error_line(capsys)
    assert main(base + ["--objective", "flow", "--mp", "none", "--conditioning", "adaln-zero"]) == 0
    capsys.readouterr()
    for extra, fragment in ((["--sampler", "ddim"], "unknown sampler 'ddim' for a flow model"),
                            (["--time-shift", "0"], "--time-shift must be"),
                            (["--time-shift", "-2"], "--time-shift must be")):
        assert main(["sample", "--ckpt", str(run), "--num", "2", "--out", str(tmp_path / "x.png"), *extra]) == 2
        assert fragment in error_line(capsys)
        assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(run), "--num", "2", "--out", str(tmp_path / "x.png"), "--time-shift", "inf"])
    assert "--time-shift" in error_line(capsys) and not (tmp_path / "x.png").exists()
    assert main(["eval", "--ckpt", str(run), "--protocol", "fid10k", "--reference-npz", str(tmp_path / "r.npz")]) == 2
    assert "a flow model has not" in error_line(capsys)
    assert main(["train", "--resume", str(run), "--objective", "ddpm"]) == 2
    assert "--objective cannot be given" in error_line(capsys)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "x", "objective": "score"}]))
    assert main(["ablate", "--grid", str(grid), "--out", str(tmp_path / "g")]) == 2
    assert "unknown objective 'score'" in error_line(capsys)
    grid.write_text(json.dumps([{"name": "x", "objective": "flow"}]))
    assert main(["ablate", "--grid", str(grid), "--out", str(tmp_path / "g")]) == 2
    assert "sampler 'ddim' is not a flow sampler" in error_line(capsys)
    assert not (tmp_path / "g" / "runs").exists()


def test_the_model_imports_nothing_of_diffusion_or_training():
    """A house with no upward arrows: mpdit/model knows nothing of objectives, diffusion or training."""
    import ast
    from pathlib import Path

    import mpdit.model

    for path in Path(mpdit.model.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            upward = [n for n in names if n.startswith(("mpdit.diffusion", "mpdit.training", "mpdit.evaluation",
                                                        "mpdit.cli", "mpdit.pipeline"))]
            assert not upward, f"{path.name} imports {upward}"


def test_bad_objective_settings_are_refused_before_anything_runs(tmp_path, tiny_idx):
    """Review findings: a scheduler that does not suit the objective; flow rows or runs whose settings only fail
    later (raw time input, Min-SNR); --val-every without held-out images; more bins than steps."""
    from diffusers import DDIMScheduler

    from mpdit.evaluation.ablation import Row
    from mpdit.pipeline import MPDiTPipeline, dit_scheduler, flow_scheduler

    flow_model = MPDiT(DiTConfig(**TINY, learn_sigma=False))
    with pytest.raises(MPDiTError, match="does not sample a ddpm model"):
        MPDiTPipeline(flow_model, flow_scheduler())  # a flow scheduler and no objective: DDPM assumed
    with pytest.raises(MPDiTError, match="DDIMScheduler does not sample a flow model"):
        MPDiTPipeline(flow_model, DDIMScheduler(), objective=ObjectiveConfig("flow"))
    assert MPDiTPipeline(MPDiT(DiTConfig(**TINY)), dit_scheduler("dpm")).objective.name == "ddpm"
    with pytest.raises(MPDiTError, match="timestep-input raw"):
        Row("r", "all", objective="flow", timestep_input="raw")
    with pytest.raises(MPDiTError, match="Min-SNR"):
        TrainConfig(objective="flow", min_snr_gamma=5.0)
    images = torch.zeros(40, 1, 8, 8, dtype=torch.uint8)
    no_test_split = ImageDataset(images, torch.arange(40) % 3, 3)
    model_cfg = DiTConfig(**TINY)
    with pytest.raises(MPDiTError, match="no held-out images"):
        Trainer(tmp_path / "run", model_cfg, TrainConfig(data="folder:/nonexistent", val_every=2, batch_size=8,
                                                           device="cpu", progress=False), data=no_test_split)
    assert not (tmp_path / "run").exists()
    with pytest.raises(MPDiTError, match="1 to 1000 bins"):
        make_objective(None, model_cfg).time_bins(1001)
