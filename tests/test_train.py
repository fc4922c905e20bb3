"""Training: loss goes down, kill-and-resume equality, 2-process DDP, bf16 / compile, commands and errors."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpdit.cli.main import main
from mpdit.errors import MPDiTError
from mpdit.model.config import DiTConfig
from mpdit.training import checkpoint as ckpt
from mpdit.training.train import TrainConfig, Trainer, batch_indices


def configs(data: str, **train) -> tuple[DiTConfig, TrainConfig]:
    model_cfg = DiTConfig.from_preset("DiT-Nano/4", input_size=28, in_channels=1, num_classes=10, mp="all",
                                      conditioning="scale-rotation-gate")
    options = dict(data=data, image_size=28, steps=12, batch_size=16, lr=1e-2, schedule="edm2", warmup_steps=4,
                   t_ref=100, log_every=2, telemetry_every=4, ckpt_every=4, keep_checkpoints=5, progress=False)
    options.update(train)
    return model_cfg, TrainConfig(**options)


def weights(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.load_safetensors(ckpt.latest_checkpoint(run_dir) / "model.safetensors")


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_batches_are_seeded_permutations():
    first = torch.cat([batch_indices(100, 10, seed=3, step=s) for s in range(10)])
    assert sorted(first.tolist()) == list(range(100))  # one epoch visits every item once
    assert torch.equal(batch_indices(100, 10, 3, 4), batch_indices(100, 10, 3, 4))
    assert not torch.equal(batch_indices(100, 10, 3, 10), batch_indices(100, 10, 3, 0))  # new epoch, new order
    with pytest.raises(MPDiTError, match="larger than the dataset"):
        batch_indices(5, 10, 0, 0)


def test_loss_goes_down(tmp_path):
    """A tiny MP model on 60k MNIST digits: mean loss of the last 20 steps well below the first 20."""
    model_cfg, cfg = configs("mnist", steps=150, batch_size=32, log_every=1, telemetry_every=50, ckpt_every=0,
                             warmup_steps=20, t_ref=1000)
    Trainer(tmp_path, model_cfg, cfg).run()
    losses = [entry["loss"] for entry in read_log(tmp_path)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"mean loss, first 20 steps {first:.4f}, last 20 steps {last:.4f}")
    assert last < 0.6 * first


@pytest.mark.parametrize("keep,kept", [(2, [8, 12]), (0, [4, 8, 12])])
def test_keep_checkpoints(tmp_path, tiny_idx, keep, kept):
    model_cfg, cfg = configs(tiny_idx, keep_checkpoints=keep, telemetry_every=0)
    Trainer(tmp_path, model_cfg, cfg).run()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == kept
    with pytest.raises(MPDiTError, match="keep_checkpoints must be >= 0"):
        configs(tiny_idx, keep_checkpoints=-1)


def test_log_has_telemetry_and_checkpoint_layout(tmp_path, tiny_idx):
    model_cfg, cfg = configs(tiny_idx)
    Trainer(tmp_path, model_cfg, cfg).run()
    log = read_log(tmp_path)
    entry = next(e for e in log if "telemetry" in e)
    assert {"loss", "lr", "grad_norm", "images_per_s", "step"} <= set(entry)
    assert len(entry["telemetry"]["act_rms"]) == model_cfg.depth == len(entry["telemetry"]["weight_rms"])
    assert all(abs(w - 1) < 1e-2 for w in entry["telemetry"]["weight_rms"])  # forced weight norm
    step_dir = tmp_path / "checkpoints" / "step-0000012"
    assert {"model.safetensors", "config.json", "ema.safetensors", "training_state.pt",
            "ema-sigma-0.050.safetensors"} <= {p.name for p in step_dir.iterdir()}
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8, 12]


def killed_run(run, model_cfg, cfg, monkeypatch, at_step, before_death=None):
    """Train until ``at_step`` steps are done, then die as a kill would (KeyboardInterrupt in the next step),
    after ``before_death()`` if given (e.g. to leave a half-written checkpoint behind)."""
    original = Trainer.train_step

    def dying_step(self, record):
        if self.step == at_step:
            if before_death is not None:
                before_death()
            raise KeyboardInterrupt
        return original(self, record)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(run, model_cfg, cfg).run()
    monkeypatch.setattr(Trainer, "train_step", original)


def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_idx, monkeypatch):
    model_cfg, cfg = configs(tiny_idx)
    Trainer(tmp_path / "whole", model_cfg, cfg).run()

    # a run killed during step 7: its last checkpoint is step 4, and a half-written one is left behind
    killed = tmp_path / "killed"
    killed_run(killed, model_cfg, cfg, monkeypatch, 6,
               before_death=lambda: (killed / "checkpoints" / "step-0000008.tmp-999").mkdir(parents=True))
    assert [s for s, _ in ckpt.list_checkpoints(killed)] == [4]

    resumed = Trainer(killed, model_cfg, cfg, resume=True)
    assert resumed.step == 4
    resumed.run()
    whole, again = weights(tmp_path / "whole"), weights(killed)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    for name in ("ema.safetensors", "ema-sigma-0.100.safetensors"):
        a = ckpt.load_safetensors(ckpt.latest_checkpoint(tmp_path / "whole") / name)
        b = ckpt.load_safetensors(ckpt.latest_checkpoint(killed) / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a), name


def test_resume_command_extends_a_run(tmp_path, tiny_idx, capsys):
    common = ["--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--ckpt-every", "5",
              "--log-every", "5", "--no-progress", "--t-ref", "50", "--warmup-steps", "2"]
    assert main(["train", *common, "--steps", "5", "--out", str(tmp_path / "run")]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "10", "--no-progress"]) == 0
    assert "trained to step 10: checkpoint " in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "10", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 10
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [5, 10]
    # a new run into a folder that holds one is refused
    with pytest.raises(MPDiTError, match="already holds a run"):
        main_raise(["train", *common, "--steps", "5", "--out", str(tmp_path / "run")])


def main_raise(argv):
    """Run a command's function directly so its MPDiTError reaches the test."""
    from mpdit.cli.main import build_parser
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_resume_errors(tmp_path, tiny_idx):
    with pytest.raises(MPDiTError, match="is not a training run: missing config.json"):
        main_raise(["train", "--resume", str(tmp_path)])
    model_cfg, cfg = configs(tiny_idx, steps=4)
    Trainer(tmp_path / "run", model_cfg, cfg).run()
    state = tmp_path / "run" / "checkpoints" / "step-0000004" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(MPDiTError, match="corrupt or truncated"):
        main_raise(["train", "--resume", str(tmp_path / "run")])


def test_bad_data_errors(tmp_path):
    with pytest.raises(MPDiTError):
        main_raise(["train", "--data", f"folder:{tmp_path}", "--out", str(tmp_path / "run"), "--steps", "1"])


def test_train_on_mixed_size_folder_decodes_it_once(tmp_path, monkeypatch):
    from PIL import Image

    from mpdit.data import datasets
    for k, (cls, size) in enumerate([("a", (10, 10)), ("a", (12, 20)), ("b", (9, 9)), ("b", (16, 16))]):
        (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(size, 40 * k, np.uint8)).save(tmp_path / "data" / cls / f"{k}.png")
    decoded = []
    real_decode = datasets._decode_image
    monkeypatch.setattr(datasets, "_decode_image", lambda path: decoded.append(path) or real_decode(path))
    main_raise(["train", "--data", f"folder:{tmp_path / 'data'}", "--image-size", "8", "--model", "DiT-Nano/4",
                "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--sample-every", "0",
                "--no-progress"])
    assert len(decoded) == 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["input_size"] == 8


def test_bf16_path(tmp_path, tiny_idx):
    model_cfg, cfg = configs(tiny_idx, steps=4, precision="bf16", ckpt_every=0)
    Trainer(tmp_path, model_cfg, cfg).run()
    log = read_log(tmp_path)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log)


def test_compiled_training_trains_the_eager_weights(tmp_path, tiny_idx):
    """Forced normalization mutates the weights inside the compiled forward; the label table is the layer where a
    lost mutation showed (torch 2.13 dropped a foreach copy into parameters: rows zeroed, others not normalized)."""
    for compiled in (False, True):
        model_cfg, cfg = configs(tiny_idx, steps=4, compile=compiled, ckpt_every=4, telemetry_every=2)
        Trainer(tmp_path / str(compiled), model_cfg, cfg).run()
    eager, compiled = weights(tmp_path / "False"), weights(tmp_path / "True")
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    print(f"largest weight difference, compiled vs eager after 4 steps: {worst:.2e}")
    assert worst < 1e-4
    table = compiled["y_embedder.embedding_table.weight"]
    # rows at RMS 1, moved off it only by the last optimizer step
    assert torch.allclose(table.square().mean(dim=1).sqrt(), torch.ones(len(table)), atol=1e-2)
    assert len(read_log(tmp_path / "True")[-1]["telemetry"]["act_rms"]) == model_cfg.depth  # hooks ran


def test_two_processes_match_one(tmp_path, tiny_idx):
    """torchrun with 2 CPU processes (gloo), global batch 16 split 8 + 8, against 1 process with batch 16."""
    args = ["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", "6",
            "--ckpt-every", "3", "--no-progress", "--t-ref", "50", "--warmup-steps", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # gloo over loopback only
    with socket.socket() as probe:  # a free port, so parallel or back-to-back runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={port}", "-m", "mpdit.cli.main", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, "\n".join(l for l in two.stderr.splitlines() if "Warning" not in l)[-3000:]
    assert "x2" in two.stdout  # the run reported two processes
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"largest weight difference, 2 processes vs 1: {worst:.2e}")
    assert worst < 1e-4
