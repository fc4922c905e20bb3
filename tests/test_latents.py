"""VAE latents end to end on tiny stand-ins: `mpdit encode` (skip, shards, resume), training on latents:PATH,
decoding in `mpdit sample`, the FID protocol, official-layout DiT checkpoints, presets and export."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mpdit.cli.eval import fid_protocol
from mpdit.cli.main import build_parser, main
from mpdit.cli.train import build_configs
from mpdit.data.datasets import load_dataset
from mpdit.data.latents import LatentDecoder, encode_folder, load_vae, read_image, shard_name
from mpdit.errors import MPDiTError
from mpdit.model.config import DiTConfig
from mpdit.model.convert import to_official
from mpdit.model.dit import MPDiT, build_model
from mpdit.training.checkpoint import load_safetensors
from mpdit.training.train import TrainConfig, Trainer, global_batch


def tiny_vae_folder(path):
    """A random-weight AutoencoderKL (2 blocks: 32x32 images -> 4x16x16 latents) saved to `path`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=32, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    (root / "images" / "dog" / "corrupt.png").write_bytes(b"not an image")
    vae = tiny_vae_folder(root / "vae")
    assert main(["encode", str(root / "images"), "--out", str(root / "enc"), "--vae", vae, "--resolution", "32",
                 "--flip", "--shard-size", "3", "--batch-size", "2", "--no-progress"]) == 0
    return root, vae


def test_encode_skips_corrupt_files_and_shards_round_trip(setup, capsys):
    root, vae = setup
    meta = json.loads((root / "enc" / "metadata.json").read_text())
    assert (meta["num_images"], meta["num_items"], meta["skipped"], meta["num_shards"]) == (8, 16, 1, 3)
    assert meta["class_names"] == ["cat", "dog"] and meta["latent_shape"] == [4, 16, 16] and meta["vae"] == vae
    shard = load_safetensors(root / "enc" / shard_name(0))
    assert shard["mean"].shape == (6, 4, 16, 16) and shard["mean"].dtype == torch.float16
    assert shard["labels"].tolist() == [0] * 6
    x = torch.from_numpy(read_image(root / "images" / "cat" / "0.png", 32)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        posterior = load_vae(vae).encode(torch.cat([x, x.flip(-1)])).latent_dist
    torch.testing.assert_close(shard["mean"][:2].float(), posterior.mean, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(shard["std"][:2].float(), posterior.std, atol=2e-3, rtol=2e-3)
    data = load_dataset(f"latents:{root / 'enc'}")
    assert (len(data), data.channels, data.resolution, data.num_classes) == (16, 4, (16, 16), 2)
    assert data.labels.tolist() == [0] * 8 + [1] * 8
    z = data.model_batch(torch.arange(16), torch.Generator().manual_seed(0))
    assert z.shape == (16, 4, 16, 16) and abs(float(z.mean())) < 0.2


def test_interrupted_encoding_resumes_missing_shards_only(setup, tmp_path):
    root, vae = setup
    out = tmp_path / "enc"
    kwargs = dict(vae=vae, resolution=32, shard_size=3, progress=False)
    encode_folder(root / "images", out, **kwargs)
    before = {k: (out / shard_name(k)).stat().st_mtime_ns for k in range(3)}
    (out / shard_name(1)).unlink()
    (out / "metadata.json").unlink()
    with pytest.raises(MPDiTError, match="unfinished"):
        load_dataset(f"latents:{out}")
    meta = encode_folder(root / "images", out, **kwargs)
    after = {k: (out / shard_name(k)).stat().st_mtime_ns for k in range(3)}
    assert after[0] == before[0] and after[2] == before[2] and meta["num_images"] == 8
    with pytest.raises(MPDiTError, match="another resolution"):
        encode_folder(root / "images", out, **{**kwargs, "resolution": 16})


@pytest.fixture(scope="module")
def latent_run(setup):
    root, _ = setup
    data = f"latents:{root / 'enc'}"
    model_cfg = DiTConfig.from_preset("DiT-Nano/2", input_size=16, in_channels=4, num_classes=2, mp="all",
                                      conditioning="scale-rotation-gate")
    cfg = TrainConfig(data=data, steps=2, batch_size=4, ckpt_every=2, progress=False, ema_sigma_rels=())
    trainer = Trainer(root / "run", model_cfg, cfg)
    first = global_batch(trainer.data, cfg, trainer.objective, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, global_batch(trainer.data, cfg, trainer.objective, 0)))
    trainer.run()
    return root / "run"


def test_training_on_latents_and_sampling_decodes(latent_run, tmp_path, capsys):
    log = [json.loads(line) for line in (latent_run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and np.isfinite(log[-1]["loss"])
    assert main(["sample", "--ckpt", str(latent_run), "--num", "3", "--steps", "2", "--json", "--out",
                 str(tmp_path / "s.png")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["vae"].endswith("vae")
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 32, 32, 3)
    with pytest.raises(MPDiTError, match="--protocol fid10k"):
        args = build_parser().parse_args(["eval", "--ckpt", str(latent_run)])
        args.func(args)


class MeanColor(torch.nn.Module):
    """A stand-in feature network: uint8 (N, 3, H, W) -> per-channel means and stds (N, 6)."""

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_protocol_end_to_end(setup, latent_run, tmp_path):
    root, _ = setup
    from mpdit.cli.sample import load_checkpoint_model

    model, _, _ = load_checkpoint_model(latent_run)
    decode = LatentDecoder.for_data(f"latents:{root / 'enc'}")
    result = fid_protocol(model, decode, num=5, batch_size=2, cfg_scale=1.5, out_dir=tmp_path,
                          reference=f"folder:{root / 'images'}", feature_module=MeanColor(), progress=False)
    assert np.isfinite(result["metrics"]["fid"]) and result["protocol"]["steps"] == 250
    assert result["protocol"]["reference"].startswith("8 images")
    samples = np.load(result["npz"])
    assert samples["arr_0"].shape == (5, 32, 32, 3) and samples["labels"].shape == (5,)
    # the same samples scored against themselves (arr_0) and against their own mu/sigma: FID about 0
    again = fid_protocol(model, decode, num=5, batch_size=2, cfg_scale=1.5, out_dir=tmp_path / "b",
                         reference_npz=result["npz"], feature_module=MeanColor(), progress=False)
    assert np.array_equal(np.load(again["npz"])["arr_0"], samples["arr_0"]) and abs(again["metrics"]["fid"]) < 1e-4
    with pytest.raises(MPDiTError, match="needs one of --reference"):
        fid_protocol(model, decode, num=2, batch_size=2, out_dir=tmp_path, feature_module=MeanColor(), progress=False)


def test_official_layout_checkpoint_samples_through_the_vae(setup, tmp_path, capsys):
    _, vae = setup
    torch.manual_seed(0)
    model = build_model("DiT-Nano/2", input_size=16, in_channels=4, num_classes=5)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # not a zero output
    torch.save(to_official(model.state_dict()), tmp_path / "DiT-Nano-2.pt")
    assert main(["sample", "--dit-checkpoint", str(tmp_path / "DiT-Nano-2.pt"), "--vae", vae, "--num", "2",
                 "--steps", "2", "--classes", "1,4", "--json", "--out", str(tmp_path / "o.png")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["weights"] == "official DiT"
    assert np.load(tmp_path / "o.npz")["arr_0"].shape == (2, 32, 32, 3)
    assert LatentDecoder.official(vae).channel_std[0] == pytest.approx(1 / 0.18215)


def test_presets_fill_unset_options(setup):
    root, _ = setup
    data = f"latents:{root / 'enc'}"
    parse = lambda *argv: build_parser().parse_args(["train", "--data", data, "--out", "x", *argv])  # noqa: E731
    model_cfg, cfg, _ = build_configs(parse("--preset", "paper-s2", "--mp", "none", "--conditioning", "adaln-zero",
                                         "--batch-size", "8"))
    assert (model_cfg.name, model_cfg.input_size, model_cfg.in_channels) == ("DiT-S/2", 16, 4)
    assert (cfg.batch_size, cfg.steps, cfg.lr, cfg.schedule, cfg.warmup_steps) == (8, 400_000, 1e-4, "constant", 0)
    model_cfg, cfg, _ = build_configs(parse("--preset", "paper-xs2"))
    assert (model_cfg.name, model_cfg.conditioning, cfg.batch_size, cfg.lr, cfg.schedule) == \
        ("DiT-XS/2", "scale-rotation-gate", 256, 1e-2, "edm2")
    assert (cfg.warmup_steps, cfg.t_ref, cfg.ema_sigma_rels) == (39_062, 560_000, (0.05, 0.10))
    _, cfg, _ = build_configs(parse("--preset", "paper-xs2", "--recipe", "authors", "--attention-output", "plain"))
    assert (cfg.steps, cfg.warmup_steps, cfg.t_ref, cfg.grad_clip) == (400_000, 2667, 40_000, 0.1)
    with pytest.raises(MPDiTError, match="4x16x16 latents"):
        build_configs(build_parser().parse_args(["train", "--preset", "paper-s4", "--out", "x"]))


def test_export_checkpoint_writes_card_and_latent_space(setup, latent_run, tmp_path):
    from mpdit.model.hub import read_info
    from mpdit.training.export import export_checkpoint

    out = export_checkpoint(latent_run, tmp_path / "export")
    info = read_info(out)
    assert info["latents"]["vae"] == setup[1] and info["train_config"]["steps"] == 2
    assert "Training config" in (out / "README.md").read_text()
    assert MPDiT.from_pretrained(out).config.in_channels == 4
