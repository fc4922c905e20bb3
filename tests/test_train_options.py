"""`mpdit train` options for the paper's exact model and recipe: --attention-output and --recipe."""

import pytest

from mpdit.cli.main import build_parser
from mpdit.cli.train import build_configs
from mpdit.errors import MPDiTError
from mpdit.training.schedules import recipe_options


def configs(tiny_idx, *argv):
    return build_configs(build_parser().parse_args(["train", "--data", tiny_idx, "--model", "DiT-Nano/4",
                                                    "--out", "x", *argv]))


def test_recipe_constants():
    assert recipe_options("authors", 400_000, 256) == dict(warmup_steps=2667, t_ref=40_000, grad_clip=0.1)
    assert recipe_options("edm2", 400_000, 256) == dict(warmup_steps=39_062, t_ref=560_000, grad_clip=None)
    assert recipe_options("edm2", 1000, 64)["t_ref"] == 2_240_000  # counted in images: 4x the steps at batch 64
    with pytest.raises(MPDiTError, match="unknown recipe 'dit'"):
        recipe_options("dit", 10, 1)


def test_recipe_fills_the_mp_schedule_unless_given(tiny_idx):
    _, cfg, _ = configs(tiny_idx, "--recipe", "authors", "--steps", "3000")
    assert (cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.t_ref, cfg.grad_clip) == ("edm2", 1e-2, 20, 300, 0.1)
    _, cfg, _ = configs(tiny_idx, "--recipe", "authors", "--steps", "3000", "--grad-clip", "1", "--t-ref", "77")
    assert (cfg.warmup_steps, cfg.t_ref, cfg.grad_clip) == (20, 77, 1.0)
    _, cfg, _ = configs(tiny_idx, "--recipe", "edm2", "--steps", "3000", "--batch-size", "100")
    assert (cfg.warmup_steps, cfg.t_ref, cfg.grad_clip) == (100_000, 1_433_600, None)
    _, cfg, _ = configs(tiny_idx, "--steps", "3000")  # no recipe: the options as given
    assert (cfg.warmup_steps, cfg.t_ref, cfg.grad_clip) == (200, 1000, None)
    _, cfg, _ = configs(tiny_idx, "--mp", "none", "--schedule", "edm2", "--recipe", "authors", "--steps", "1500")
    assert (cfg.lr, cfg.warmup_steps, cfg.t_ref, cfg.grad_clip) == (1e-4, 10, 150, 0.1)
    with pytest.raises(MPDiTError, match="uses the constant schedule .* drop --recipe or add --schedule edm2"):
        configs(tiny_idx, "--mp", "none", "--conditioning", "adaln-zero", "--recipe", "authors")


def test_attention_output_switch(tiny_idx):
    model_cfg, _, _ = configs(tiny_idx)
    assert model_cfg.normalize_attention_output
    model_cfg, _, _ = configs(tiny_idx, "--attention-output", "plain")
    assert not model_cfg.normalize_attention_output and model_cfg.has("cosine_attention")
    model_cfg, _, _ = configs(tiny_idx, "--mp", "cosine_attention", "--conditioning", "adaln-zero",
                              "--attention-output", "plain")
    assert not model_cfg.normalize_attention_output
    with pytest.raises(MPDiTError, match="needs the cosine_attention switch"):
        configs(tiny_idx, "--mp", "weight_norm", "--attention-output", "plain")
    with pytest.raises(SystemExit):
        configs(tiny_idx, "--attention-output", "rms")
