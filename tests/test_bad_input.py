"""Every bad input is one line (issue 25): a table of commands run through the CLI's entry point in-process, each
row with its expected exit status and a fragment of its message; the test asserts one line on stderr, no traceback,
a non-zero exit and no file changed in the run, the data or the test's folder. Then the cases that need more than a
command line (a metric that turns NaN, the Python API)."""

import argparse
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch

from mpdit.cli.main import main
from mpdit.errors import MPDiTError, nonfinite_number
from mpdit.files import read_json, strict_json
from mpdit.model.config import DiTConfig
from mpdit.model.convert import to_official
from mpdit.model.dit import build_model
from mpdit.training import checkpoint as ckpt
from mpdit.training.train import TrainConfig, Trainer
from conftest import train_tiny_run, write_idx


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_idx):
    """A tiny trained run (DiT-Nano/4, 2 steps) to point commands at."""
    return train_tiny_run(tmp_path_factory.mktemp("bad_input_run"), tiny_idx, steps=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory, run):
    """Bad input files: grids, configs, data folders, logs."""
    folder = tmp_path_factory.mktemp("bad_input_files")

    def grid(name: str, value) -> None:
        (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))

    grid("nan-lr.json", '[{"name": "a", "lr": NaN}]')
    grid("inf-scale.json", '{"budget": {"cfg_scales": [1.0, Infinity]}, "rows": [{"name": "a"}]}')
    grid("deep.json", "[" * 100_000 + "]" * 100_000)
    (folder / "latin1.json").write_bytes(b'[{"name": "caf\xe9"}]')
    config = json.loads((run / "config.json").read_text())
    for name, changed in (("big-model", {**config, "hidden_size": 2 ** 30}),
                          ("no-depth", {k: v for k, v in config.items() if k != "depth"})):
        shutil.copytree(ckpt.latest_checkpoint(run), folder / name)  # a checkpoint folder with a changed config
        (folder / name / "config.json").write_text(json.dumps(changed))
    bad_log = folder / "bad-log-run"
    bad_log.mkdir()
    (bad_log / "log.jsonl").write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \xff}\n')
    for name, rows in (("up.json", [{"name": "../../escaped"}]), ("absolute.json", [{"name": "/tmp/escaped"}]),
                       ("nul.json", [{"name": "a\u0000b"}]), ("empty.json", [{"name": ""}]),
                       ("dot.json", [{"name": "./x"}]), ("case.json", [{"name": "mp"}, {"name": "MP"}])):
        grid(name, rows)
    assert main(["export", "--ckpt", str(run), "--out", str(folder / "export")]) == 0
    model_only = folder / "model-only"
    model_only.mkdir()
    (model_only / "config.json").write_text(json.dumps(config))
    official = to_official(build_model("DiT-Nano/2", input_size=8, in_channels=4, num_classes=9).state_dict())
    torch.save({"ema": official, "args": argparse.Namespace(model="DiT-Nano/2")}, folder / "pickled.pt")
    torch.save(official, folder / "no-null.pt")  # 10 label rows, read with --dit-num-classes 10: no null class
    labels = folder / "bad-test-labels"
    labels.mkdir()
    rng = np.random.default_rng(0)
    for prefix, label_values in (("train", np.arange(32) % 10), ("t10k", np.array([0, 1, 2, 255]))):
        write_idx(labels / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (len(label_values), 28, 28)))
        write_idx(labels / f"{prefix}-labels-idx1-ubyte.gz", label_values)
    return folder


# (command with {run}, {files}, {out}, {data} in it, exit status, fragment of the one line)
CASES = [
    # already one line before issue 25 (kept so)
    ("train --resume {out}/nothing", 2, "is not a training run: missing config.json"),
    ("train --data {data} --model DiT-Huge/4 --out {out}/r", 2, "unknown model 'DiT-Huge/4'"),
    ("train --data nope:x --out {out}/r", 2, "unknown dataset spec 'nope:x'"),
    ("train --data {data} --from-step 2 --out {out}/r", 2, "--from-step goes with --resume DIR"),
    ("train --data {data} --out {run}", 2, "already holds a run: use --resume"),
    ("train --resume {run} --lr 0.1", 2, "--resume continues a run as it was set up, so --lr cannot be given"),
    ("train --data {data} --steps abc --out {out}/r", 2, "argument --steps: invalid int value: 'abc'"),
    ("ablate --grid {out}/missing.json --out {out}/g", 2, "no grid file at"),
    ("ablate --preset paper --report --out {out}/g", 2, "holds no runs to report: run the grid first"),
    ("ablate --preset paper --report --only dit --out {out}/g", 2, "give --report or --only, not both"),
    ("sample --ckpt {run} --classes 3,12 --out {out}/x.png", 2, "class 12 is out of range"),
    ("eval --ckpt {run} --num 0 --out {out}/e.json", 2, "--num must be >= 1"),
    ("bench --variants all-rotation", 2, "should look like mp:conditioning"),
    ("nope", 2, "argument COMMAND: invalid choice: 'nope'"),
    # item 3: numbers
    ("train --data {data} --min-snr-gamma nan --out {out}/r", 2, "argument --min-snr-gamma: nan is not a finite number"),
    ("train --data {data} --lr inf --out {out}/r", 2, "argument --lr: inf is not a finite number"),
    ("train --data {data} --class-dropout -inf --out {out}/r", 2, "argument --class-dropout: expected one argument"),
    ("train --data {data} --betas 0.9,nan --out {out}/r", 2, "--betas takes comma-separated finite numbers"),
    ("train --data {data} --ema-sigma-rels 0.05,inf --out {out}/r", 2, "--ema-sigma-rels takes comma-separated finite"),
    ("sample --ckpt {run} --cfg-scale nan --out {out}/x.png", 2, "argument --cfg-scale: nan is not a finite number"),
    ("eval --ckpt {run} --cfg-scale inf --out {out}/e.json", 2, "argument --cfg-scale: inf is not a finite number"),
    ("ema --run {run} --sigma-rel nan --out {out}/ema", 2, "argument --sigma-rel: nan is not a finite number"),
    ("classifier --data {data} --lr nan --out {out}/c", 2, "argument --lr: nan is not a finite number"),
    ("ablate --preset paper --cfg-scales 1,nan --out {out}/g", 2, "argument --cfg-scale/--cfg-scales: nan is not"),
    ("ablate --preset paper --lr-sweep 1e-3,inf --out {out}/g", 2, "argument --lr-sweep: inf is not a finite number"),
    ("ablate --preset paper --shared-lr nan --out {out}/g", 2, "argument --shared-lr: nan is not a finite number"),
    ("ablate --grid {files}/nan-lr.json --out {out}/g", 2, "option 'lr' must be a finite number, got nan"),
    ("ablate --grid {files}/inf-scale.json --out {out}/g", 2, "budget option 'cfg_scales[1]' must be a finite number"),
    ("ablate --grid {files}/deep.json --out {out}/g", 2, "deep.json is nested too deeply to read"),
    ("ablate --grid {files}/latin1.json --out {out}/g", 2, "latin1.json is not UTF-8 text (byte 0xe9 at offset 14)"),
    ("plot {files}/bad-log-run --out {out}/p", 2, "log.jsonl is not UTF-8 text (byte 0xff"),
    ("sample --ckpt {files}/big-model --out {out}/x.png", 2, "GiB for its float32 weights, more than the"),
    ("sample --ckpt {files}/no-depth --out {out}/x.png", 2, "config.json lacks the key 'depth'"),
    ("train --data idx:{files}/bad-test-labels --steps 1 --out {out}/r", 2,
     "t10k-labels-idx1-ubyte.gz holds label 255, but the data has 10 classes"),
    ("train --data {data} --model DiT-Nano/4 --image-size 4 --steps 1 --out {out}/r", 2, "is a single patch"),
    # item 5: messages that say what is true
    ("train --resume {run} --steps 1", 2, "--steps 1 is below step 2, where"),
    ("sample --dit-checkpoint {files}/pickled.pt --out {out}/x.png", 2,
     "holds pickled Python objects (argparse.Namespace) that safe loading refuses: mpdit never unpickles"),
    ("sample --dit-checkpoint {files}/pickled.pt --ckpt {run} --out {out}/x.png", 2, "not both"),
    ("sample --dit-checkpoint {files}/no-null.pt --dit-num-classes 10 --cfg-scale 4 --out {out}/x.png", 2,
     "has no null class (it was trained without label dropout), so classifier-free guidance cannot work"),
    ("quickstart --out {run} --steps 3 --seed 5 --no-compile", 2, "trains with seed 0: continuing it cannot apply"),
    # item 2: nothing outside --out, nothing overwritten that the user did not name
    ("ablate --grid {files}/up.json --out {out}/g", 2, "grid row name '../../escaped' must be one folder name"),
    ("ablate --grid {files}/absolute.json --out {out}/g", 2, "grid row name '/tmp/escaped' must be one folder"),
    ("ablate --grid {files}/nul.json --out {out}/g", 2, "grid row name 'a\\x00b' must be one folder name"),
    ("ablate --grid {files}/empty.json --out {out}/g", 2, "grid row name '' must be one folder name"),
    ("ablate --grid {files}/dot.json --out {out}/g", 2, "grid row name './x' must be one folder name"),
    ("ablate --grid {files}/case.json --out {out}/g", 2, "grid rows 'mp' and 'MP' would share one folder"),
    ("eval --ckpt {run} --num 10 --out {run}/checkpoints/step-0000002/config.json", 2,
     "step-0000002/config.json would replace config.json, which the run, checkpoint or exported model"),
    ("eval --ckpt {run} --num 10 --out {run}/train_config.json", 2, "would replace train_config.json"),
    ("eval --ckpt {run} --num 10 --out {run}/checkpoints/step-0000002/model.safetensors", 2,
     "would replace model.safetensors"),
    ("train --data {data} --out {files}/export", 2, "export holds an exported model (README.md): writing a training"),
    ("train --data {data} --out {files}/model-only", 2, "holds a model (config.json) that is not a training run"),
    ("train --data {data} --out {run}/checkpoints", 2, "which only its training run writes"),
    ("train --data {data} --out {run}/ema_snapshots/new", 2, "ema_snapshots, which only its training run writes"),
    ("ema --run {run} --sigma-rel 0.07 --out {run}/checkpoints", 2, "which only its training run writes"),
    ("ema --run {run} --sigma-rel 0.07 --out {run}/ema_snapshots", 2, "which only its training run writes"),
    ("ema --run {run} --sigma-rel 0.07 --out {files}/export", 2, "holds an exported model (README.md)"),
    # issue 23: objectives and DyT (the run is a DDPM MP model)
    ("train --data {data} --objective score --out {out}/r", 2, "argument --objective: invalid choice: 'score'"),
    ("train --data {data} --objective flow --time-sampling beta --out {out}/r", 2,
     "argument --time-sampling: invalid choice: 'beta'"),
    ("train --data {data} --norm rms --out {out}/r", 2, "argument --norm: invalid choice: 'rms'"),
    ("train --data {data} --objective flow --logit-std 0 --out {out}/r", 2, "std must be a finite number > 0, got 0"),
    ("train --data {data} --objective flow --logit-mean inf --out {out}/r", 2, "argument --logit-mean: inf is not"),
    ("train --data {data} --objective flow --min-snr-gamma 5 --out {out}/r", 2, "flow trains with plain MSE"),
    ("train --data {data} --norm dyt --out {out}/r", 2, "the no_layernorm switch (in mp all) removes them all"),
    ("train --data {data} --width 48 --out {out}/r", 2, "width must be a multiple of the head dimension 32"),
    ("train --resume {run} --objective flow", 2, "--objective cannot be given"),
    ("sample --ckpt {run} --sampler heun --out {out}/x.png", 2, "unknown sampler 'heun' for a ddpm model"),
    ("sample --ckpt {run} --time-shift 3 --out {out}/x.png", 2, "--time-shift shifts a flow model's sampling times"),
    ("sample --ckpt {run} --time-shift nan --out {out}/x.png", 2, "argument --time-shift: nan is not a finite"),
    ("gradnoise --ckpt {run} --bins 1001 --out {out}/g.json", 2, "1 to 1000 bins"),
    ("gradnoise --ckpt {run} --out {run}/checkpoints/step-0000002/config.json", 2, "would replace config.json"),
]


def fingerprint(*folders) -> dict:
    """{path: sha1 of its bytes, or 'folder'} of everything under ``folders``."""
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for folder in folders for p in sorted(folder.rglob("*"))}


def run_cli(argv: list[str]) -> int:
    """main(argv), with argparse's exit (SystemExit) read as the status it carries."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("command,status,fragment", CASES, ids=[c[0].split(" --out")[0][:60] for c in CASES])
def test_bad_input_is_one_line(command, status, fragment, run, files, tiny_idx, tmp_path, capsys):
    watched = (run, files, tmp_path)
    before = fingerprint(*watched)
    argv = command.format(run=run, files=files, out=tmp_path, data=tiny_idx).split()
    assert run_cli(argv) == status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    assert fragment in lines[0], lines[0]
    assert fingerprint(*watched) == before


def test_a_nan_metric_is_an_error_and_writes_nothing(run, tmp_path, monkeypatch, capsys):
    """A metric that comes out NaN (here: patched in) ends `mpdit eval` with one line and status 2, and no eval.json
    holding a bare NaN."""
    import mpdit.cli.eval as eval_command
    real = eval_command.evaluate

    def nan_metrics(*args, **kwargs):
        result = real(*args, **kwargs)
        result["metrics"]["fd_classifier"] = math.nan
        return result

    monkeypatch.setattr(eval_command, "evaluate", nan_metrics)
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(run), "--num", "10", "--steps", "2", "--no-baseline", "--json", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.fd_classifier is nan, not a finite number, so it was not written" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 140737488355328 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB"),
], ids=["cpu", "cuda"])
def test_out_of_memory_names_the_batch_size(error, tiny_idx, tmp_path, monkeypatch, capsys):
    """An allocation that fails in a training step (as torch reports it on the CPU and on CUDA): one line naming the
    batch size and a smaller one, status 2, and the run's checkpoints untouched (written whole)."""
    argv = ["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", "4",
            "--ckpt-every", "2", "--no-progress", "--out", str(tmp_path / "r")]
    real = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, record: real(self, record) if self.step < 3 else
                        (_ for _ in ()).throw(error))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    wanted = "CUDA could not allocate 20.00 GiB" if isinstance(error, torch.OutOfMemoryError) else \
        "the CPU could not allocate 131,072.00 GiB"
    assert len(err) == 1 and f"out of memory: {wanted} with --batch-size 16: if the batch is what does not fit, " \
        "try --batch-size 8" in err[0], err
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "r")] == [2]


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_failing_writer_is_one_line_and_keeps_the_previous_checkpoint(writer, tiny_idx, tmp_path, monkeypatch,
                                                                        capsys):
    """A full disk as the libraries report it (SafetensorError, torch.save's RuntimeError), not as an OSError: during
    the step-4 checkpoint, one line with the path and the cause, status 2, and step 2's checkpoint intact."""
    import safetensors

    import mpdit.files as files_module
    argv = ["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", "4",
            "--ckpt-every", "2", "--no-progress", "--out", str(tmp_path / "r")]
    real_save_file, real_save = files_module.save_file, torch.save

    def full(real, error):
        def write(*args, **kwargs):
            if "step-0000004" in str(args[1]):
                raise error
            return real(*args, **kwargs)
        return write

    if writer == "safetensors":
        monkeypatch.setattr(files_module, "save_file", full(real_save_file, safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')))
    else:
        monkeypatch.setattr(torch, "save", full(real_save, RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write" in err[0] and "step-0000004" in err[0], err
    assert ("SafetensorError: Error while serializing" if writer == "safetensors" else "RuntimeError: [enforce fail")\
        in err[0] and "the newest intact checkpoint is" in err[0] and err[0].count("step-0000002") == 1
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "r")] == [2]
    assert not [p for p in (tmp_path / "r").rglob("*") if ".tmp-" in p.name]
    assert main(["train", "--resume", str(tmp_path / "r"), "--no-progress"]) == 0


@pytest.mark.parametrize("offline", ["no network", "HF_HUB_OFFLINE"])
def test_a_hub_id_without_network_fails_fast_in_one_line(offline, monkeypatch):
    """No network (simulated: the Hub's host cannot be reached) or HF_HUB_OFFLINE=1, and ids in no local cache: the
    VAE and the model loaders end within seconds with one line naming the id and how to pass a local folder."""
    import time

    import huggingface_hub.constants

    import mpdit.hub_access as hub_access
    from mpdit.data.latents import load_vae
    from mpdit.model.dit import MPDiT
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        assert hub_access.hub_unreachable() == "HF_HUB_OFFLINE is set"
    else:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    for load, message in [(lambda: load_vae("nobody/no-such-vae"), r"cannot get the VAE 'nobody/no-such-vae' from "
                                                                    r"the Hub .* pass --vae PATH, a local"),
                          (lambda: MPDiT.from_pretrained("nobody/no-such-model"), r"cannot get the model "
                           r"'nobody/no-such-model' from the Hub .* pass a local folder holding config.json")]:
        started = time.monotonic()
        with pytest.raises(MPDiTError, match=message) as error:
            load()
        assert time.monotonic() - started < 10 and "\n" not in str(error.value)


def test_strict_json_and_nonfinite_number():
    assert nonfinite_number({"a": [1.0, {"b": math.inf}]}) == ("a[1].b", math.inf)
    assert nonfinite_number({"a": [1, "nan", None]}) is None
    with pytest.raises(MPDiTError, match=r"the report: x\[0\] is nan, not a finite number"):
        strict_json({"x": [math.nan]}, "the report")
    assert strict_json({"x": 1.5}, "the report") == '{"x": 1.5}'


def test_python_api_refuses_nonfinite_and_ill_typed_fields():
    with pytest.raises(MPDiTError, match="training option 'min_snr_gamma' must be a finite number, got nan"):
        TrainConfig(min_snr_gamma=math.nan)
    with pytest.raises(MPDiTError, match="training option 'betas\\[1\\]' must be a finite number, got inf"):
        TrainConfig(betas=(0.9, math.inf))
    with pytest.raises(MPDiTError, match="model config key 'mp' must be a list of strings, got 5"):
        DiTConfig(mp=5)
    with pytest.raises(MPDiTError, match="model config key 'hidden_size' must be an integer, got \\[64\\]"):
        DiTConfig(hidden_size=[64])


def test_training_refuses_a_model_too_big_for_the_device(tiny_idx, tmp_path):
    """The estimate comes before any allocation: a hidden size of 2^20 at depth 2 (some 10^13 parameters)."""
    model_cfg = DiTConfig.from_preset("DiT-Nano/4", input_size=28, in_channels=1, num_classes=10, mp="all",
                                      hidden_size=2 ** 20)
    with pytest.raises(MPDiTError, match=r"parameters need [\d,.]+ GiB for training \(weights, gradients"):
        Trainer(tmp_path, model_cfg, TrainConfig(data=tiny_idx, image_size=28, steps=1, batch_size=16))
    assert not any(tmp_path.iterdir())


def test_estimated_params_match_the_built_models():
    from mpdit.model.dit import count_params, estimated_params
    for model, conditioning, mp in [("DiT-S/2", "adaln-zero", "none"), ("DiT-XS/4", "scale-rotation-gate", "all"),
                                    ("DiT-Micro/4", "rotation", "all"), ("DiT-Mini/8", "scale-shift-gate", "all")]:
        config = DiTConfig.from_preset(model, input_size=32, in_channels=4, num_classes=10, mp=mp,
                                       conditioning=conditioning)
        assert estimated_params(config) == count_params(config), model


def test_read_json_errors_name_the_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{nope")
    with pytest.raises(MPDiTError, match=r"grid file .*x.json is not valid JSON"):
        read_json(path, "grid file")


def test_pruning_unlinks_a_symlinked_checkpoint_and_keeps_its_target(tmp_path):
    """A checkpoint folder that is a symbolic link (to another disk): rotation removes the link, never the folder
    it points to (shutil.rmtree refused links with a bare OSError before)."""
    checkpoints = tmp_path / "run" / "checkpoints"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.safetensors").write_text("weights")
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-0000001").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (checkpoints / "step-0000002").mkdir()
    assert ckpt.prune_checkpoints(tmp_path / "run", 1) == [checkpoints / "step-0000001"]
    assert [p.name for p in checkpoints.iterdir()] == ["step-0000002"]
    assert (tmp_path / "elsewhere" / "model.safetensors").read_text() == "weights"


@pytest.mark.parametrize("name", ["dit-warmup@lr=0.003", "dit+cosine_attention", "mp-srg@lr=1e+06", "DiT_2.b"])
def test_row_names_of_the_docs_and_the_sweeps_are_allowed(name):
    from mpdit.evaluation.ablation import Row
    assert Row(name).name == name
