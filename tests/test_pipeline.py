"""MPDiTPipeline with diffusers schedulers, Hub-style save/load with the model card, and the GPU check script."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from mpdit.cli.main import main
from mpdit.data.latents import load_vae
from mpdit.model.dit import MPDiT, build_model
from mpdit.model.hub import read_info, save_pretrained
from mpdit.pipeline import MPDiTPipeline, dit_scheduler

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=32, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(path)
    return str(path)


def latent_model():
    torch.manual_seed(0)
    return build_model("DiT-Nano/2", input_size=16, in_channels=4, num_classes=3, mp="all",
                       conditioning="scale-rotation-gate")


@pytest.mark.parametrize("scheduler", ["ddim", DPMSolverMultistepScheduler, "ddpm"])
def test_pipeline_returns_pil_images_with_diffusers_schedulers(vae_folder, scheduler):
    sched = dit_scheduler(scheduler)
    assert float(sched.betas[0]) == pytest.approx(1e-4) and float(sched.betas[-1]) == pytest.approx(0.02)
    pipe = MPDiTPipeline(latent_model(), sched, vae=load_vae(vae_folder), latent_mean=[0.1] * 4, latent_std=[2.0] * 4)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(class_labels=[0, 2], num_inference_steps=4, guidance_scale=1.5,  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    images = run()
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"
    assert [im.tobytes() for im in images] == [im.tobytes() for im in run()]


def test_pixel_pipeline_and_scheduler_instances():
    torch.manual_seed(0)
    model = build_model("DiT-Nano/2", input_size=8, in_channels=1, num_classes=3)
    sched = dit_scheduler(DDIMScheduler(beta_start=0.001, beta_end=0.5, timestep_spacing="trailing"))
    assert float(sched.betas[-1]) == pytest.approx(0.02) and sched.config.timestep_spacing == "trailing"
    pipe = MPDiTPipeline(model, sched).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    (images,) = pipe(class_labels=[1], num_inference_steps=3, output_type="pt", return_dict=False)
    assert images.shape == (1, 1, 8, 8) and images.dtype == torch.uint8


def test_save_pretrained_round_trips_with_model_card(vae_folder, tmp_path):
    model = latent_model()
    latents = {"vae": vae_folder, "channel_mean": [0.0] * 4, "channel_std": [1.5] * 4}
    path = save_pretrained(model, tmp_path / "m", train_config={"lr": 0.01, "steps": 400000},
                           metrics={"fid10k": 12.5}, latents=latents)
    assert {"config.json", "model.safetensors", "README.md", "mpdit.json"} <= {p.name for p in path.iterdir()}
    card = (path / "README.md").read_text()
    assert "library_name: mpdit" in card and '"fid10k": 12.5' in card and '"steps": 400000' in card
    assert "scale-rotation-gate" in card
    loaded = MPDiT.from_pretrained(path)
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert read_info(path)["latents"] == latents
    pipe = MPDiTPipeline.from_pretrained_model(str(path), scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[0], num_inference_steps=2).images[0].size == (32, 32)


def gpu_check(*extra):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--steps", "3",
                           "--model", "DiT-Nano/2", "--batch-size", "2", "--latent-size", "8", *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_gpu_check_script_runs_on_cpu():
    result = gpu_check("--precision", "fp32", "--check-compiled")
    assert result.returncode == 0, result.stderr
    check, *lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert check["ok"] and check["max_weight_difference"] < 1e-4  # compiled training = eager training
    assert [line["variant"] for line in lines] == ["dit", "mp-scale-shift-gate", "mp-scale-rotation-gate"]
    assert all(line["all_finite"] and line["images_per_s"] > 0 for line in lines)
    assert lines[2]["params"] < lines[1]["params"]


def test_gpu_check_script_bf16_on_cpu():
    result = gpu_check()
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("objective,scheduler,steps", [("ddpm", "ddim", "ddim10"), ("flow", "euler", "10")])
@pytest.mark.parametrize("mp", ["none", "all"])
def test_pipeline_draws_the_images_of_mpdit_sample(tmp_path, capsys, objective, scheduler, steps, mp):
    """Parity, for the same seed and step count: DDIMScheduler (its default "leading" spacing, ADM's ddimN) with
    `mpdit sample --sampler ddim --steps ddimN`, FlowMatchEulerDiscreteScheduler with `--sampler euler`; identical
    uint8 images (the float outputs differ by diffusers' float32 schedule arithmetic, ~1e-6)."""
    torch.manual_seed(0)
    model = build_model("DiT-Nano/4", input_size=16, in_channels=1, num_classes=3, mp=mp,
                        learn_sigma=objective == "ddpm", conditioning="adaln-zero" if mp == "none" else "scale-rotation-gate")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))  # away from the zero init, so the outputs differ per class
    save_pretrained(model, tmp_path / "m", objective={"objective": objective, "sigma_data": 0.8})
    assert main(["sample", "--ckpt", str(tmp_path / "m"), "--weights", "raw", "--sampler", scheduler, "--steps",
                 steps, "--num", "3", "--classes", "0,1,2", "--cfg-scale", "2", "--seed", "0", "--out",
                 str(tmp_path / "s.png"), "--no-progress"]) == 0
    ours = np.load(tmp_path / "s.npz")["arr_0"][..., 0]
    pipe = MPDiTPipeline.from_pretrained_model(str(tmp_path / "m"), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(class_labels=[0, 1, 2], num_inference_steps=10, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images[..., 0]
    assert ours.std() > 10 and np.array_equal(ours, theirs)
