"""No lost work: the divergence guard, the run-folder lock, repairs after kills, --resume's option check and
--from-step (issue 12)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mpdit.errors import MPDiTError
from mpdit.training import checkpoint as ckpt
from mpdit.training.ema import list_snapshots
from mpdit.training.guard import DivergenceGuard, json_safe
from mpdit.training.rundir import LOCK_FILE, RunLock, remove_leftovers, trim_log
from mpdit.training.train import STATE_FILE, Trainer
from conftest import two_process_env
from test_train import configs, killed_run, main_raise, read_log, weights


def strict_log(run_dir) -> list[dict]:
    """log.jsonl read by a strict JSON reader (bare NaN / Infinity are refused)."""
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


# ----------------------------------------------------------------------------- divergence guard


def test_guard_flags_and_counts():
    guard = DivergenceGuard(torch.device("cpu"))
    flags = [guard.found_inf(torch.tensor(loss), torch.tensor(norm)).item()
             for loss, norm in [(1.0, 1.0), (float("nan"), 1.0), (1.0, float("inf")), (1.0, 1.0), (float("inf"), 2.0)]]
    assert flags == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert guard.counts() == (1, 3)  # (in a row now, in all)
    assert json_safe({"a": [float("nan"), 1.5, {"b": float("-inf")}], "c": "x"}) == {"a": [None, 1.5, {"b": None}],
                                                                                     "c": "x"}


def test_a_nonfinite_step_changes_nothing(tmp_path, tiny_idx, monkeypatch):
    """Step 3's loss is made NaN: its optimizer step leaves weights, moments and step count as they were; the EMAs
    stay finite; training goes on; the log counts the skipped step and is strict JSON."""
    model_cfg, cfg = configs(tiny_idx, steps=6, log_every=1, telemetry_every=0, ckpt_every=0)
    trainer = Trainer(tmp_path, model_cfg, cfg)
    real_losses = trainer.objective.training_losses

    def losses(*args, **kwargs):
        out = real_losses(*args, **kwargs)
        if trainer.step == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    def state():
        return [p.detach().clone() for p in trainer.model.parameters()] + [
            v.clone() for s in trainer.optimizer.state.values() for v in s.values()]

    seen = {}
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.update({trainer.step: [state()]}))
    trainer.optimizer.register_step_post_hook(lambda *_: seen[trainer.step].append(state()))
    monkeypatch.setattr(trainer.objective, "training_losses", losses)
    trainer.run()
    for step, (before, after) in seen.items():
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
        assert unchanged == (step == 2), step
    log = strict_log(tmp_path)
    assert [e["skipped_steps"] for e in log] == [0, 0, 1, 1, 1, 1]
    assert log[2]["loss"] is None and log[3]["loss"] is not None
    final = ckpt.latest_checkpoint(tmp_path)
    for name in ("model.safetensors", "ema.safetensors", "ema-sigma-0.050.safetensors"):
        assert all_finite(ckpt.load_safetensors(final / name)), name
    assert ckpt.load_torch(final / STATE_FILE)["skipped_steps"] == 1
    assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {5.0}  # the skipped step did not count


def test_divergence_stops_with_one_line_and_keeps_finite_checkpoints(tmp_path, tiny_idx):
    """lr 1e6 (issue 12's case): the run stops with a one-line error; every checkpoint, EMAs and optimizer
    included, is finite; the log is strict JSON."""
    model_cfg, cfg = configs(tiny_idx, steps=40, lr=1e6, warmup_steps=0, ckpt_every=3, keep_checkpoints=2,
                             log_every=1, max_bad_steps=8)
    with pytest.raises(MPDiTError, match=r"training diverged: .* not finite for the last 8 steps") as error:
        Trainer(tmp_path, model_cfg, cfg).run()
    assert "\n" not in str(error.value) and "lower --lr" in str(error.value)
    kept = ckpt.list_checkpoints(tmp_path)
    assert kept and len(kept) <= 2
    for _step, path in kept:
        for name in ("model.safetensors", "ema.safetensors", "ema-sigma-0.050.safetensors",
                     "ema-sigma-0.100.safetensors"):
            assert all_finite(ckpt.load_safetensors(path / name)), (path, name)
        state = ckpt.load_torch(path / STATE_FILE)["optimizer"]["state"]
        assert all(torch.isfinite(v).all() for s in state.values() for v in s.values())
    for _step, _sigma, path in list_snapshots(tmp_path):
        assert all_finite(ckpt.load_safetensors(path))
    log = strict_log(tmp_path)
    assert any(e["loss"] is None for e in log) and log[-1]["skipped_steps"] >= 8


def test_nonfinite_weights_are_never_saved(tmp_path, tiny_idx):
    model_cfg, cfg = configs(tiny_idx, steps=4, ckpt_every=4)
    trainer = Trainer(tmp_path, model_cfg, cfg)
    trainer.run()
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("inf")
    trainer.step = 8
    with pytest.raises(MPDiTError, match=r"checkpoint of step 8 has non-finite values .*newest checkpoint is .*4"):
        trainer.save_checkpoint()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))


# ----------------------------------------------------------------------------- the lock


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(MPDiTError, match=f"in use by training process {sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / LOCK_FILE).write_text(f"{dead_pid()} {socket.gethostname()}\n")
    with RunLock(tmp_path) as lock:
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid()) and lock.held
    assert not (tmp_path / LOCK_FILE).exists()  # released
    (tmp_path / LOCK_FILE).write_text("123 another-host\n")
    with pytest.raises(MPDiTError, match="in use by process 123 on another-host.*delete"):
        RunLock(tmp_path).acquire()


def test_train_refuses_a_folder_in_use(tmp_path, tiny_idx):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / LOCK_FILE).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(MPDiTError, match="in use by training process"):
            main_raise(["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--steps", "1", "--no-progress",
                        "--out", str(tmp_path / "run")])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (tmp_path / "run" / "config.json").exists()  # nothing written
    (tmp_path / "file").write_text("x")
    with pytest.raises(MPDiTError, match="cannot use .*file.* as a run folder"):
        main_raise(["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--steps", "1", "--no-progress",
                    "--out", str(tmp_path / "file" / "run")])


# ----------------------------------------------------------------------------- repairs after kills


def test_leftovers_are_removed_and_an_aside_checkpoint_put_back(tmp_path):
    (tmp_path / "checkpoints" / "step-0000004.tmp-999").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000008.old-77").mkdir()
    (tmp_path / "ema_snapshots").mkdir()
    (tmp_path / "ema_snapshots" / "step-0000004-sigma-0.050.safetensors.tmp-999").write_bytes(b"x")
    (tmp_path / "log.jsonl.tmp-5").write_text("")
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == ["log.jsonl.tmp-5", "step-0000004-sigma-0.050.safetensors.tmp-999",
                                               "step-0000004.tmp-999"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000008"]


def test_trim_log_keeps_the_steps_up_to_the_resume_point(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "loss": NaN}\n{"step": 6, "lo')
    trim_log(tmp_path, 5)
    assert [e["step"] for e in strict_log(tmp_path)] == [1, 2, 3, 4, 5]
    assert strict_log(tmp_path)[-1]["loss"] is None


def test_kill_before_the_first_checkpoint_allows_a_fresh_run(tmp_path, tiny_idx, monkeypatch):
    run = tmp_path / "run"
    model_cfg, cfg = configs(tiny_idx, log_every=1, snapshot_every=1)
    killed_run(run, model_cfg, cfg, monkeypatch, at_step=3)
    (run / "checkpoints" / "step-0000004.tmp-999").mkdir(parents=True)  # killed during the first checkpoint
    with pytest.raises(MPDiTError, match=f"no checkpoint to resume from .*start it again with --out {run}"):
        main_raise(["train", "--resume", str(run)])
    args = ["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", "2",
            "--log-every", "1", "--no-progress", "--out", str(run)]
    assert main_raise(args) == 0
    assert [e["step"] for e in strict_log(run)] == [1, 2]  # the old log was not appended to
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    assert [s for s, _sigma, _p in list_snapshots(run)] == [2, 2]  # the killed run's snapshots 1-3 are gone


def test_resume_repairs_log_snapshots_and_lock(tmp_path, tiny_idx, monkeypatch):
    model_cfg, cfg = configs(tiny_idx, steps=12, log_every=1, telemetry_every=0)
    run = tmp_path / "run"
    killed_run(run, model_cfg, cfg, monkeypatch, at_step=6)
    assert not (run / LOCK_FILE).exists()  # released by the dying process
    lost = sorted((run / "ema_snapshots").glob("step-0000004-*"))
    saved = {p.name: ckpt.load_safetensors(p) for p in lost}
    for path in lost:  # a kill between the checkpoint rename and the snapshot writes
        path.unlink()
    Trainer(run, model_cfg, cfg, resume=True).run()
    assert [e["step"] for e in strict_log(run)] == list(range(1, 13))  # steps 5-6 are not logged twice
    for name, tensors in saved.items():
        again = ckpt.load_safetensors(run / "ema_snapshots" / name)
        assert all(torch.equal(tensors[k], again[k]) for k in tensors), name
    assert [s for s, _sigma, _p in list_snapshots(run)] == [4, 4, 8, 8, 12, 12]


def test_resume_redraws_a_missing_final_grid(tmp_path, tiny_idx):
    run = tmp_path / "run"
    assert main_raise(["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", "2",
                       "--no-progress", "--out", str(run)]) == 0
    grid = run / "samples" / "step-0000002.png"
    grid.unlink()  # a kill during the final grid
    assert main_raise(["train", "--resume", str(run), "--no-progress"]) == 0
    assert grid.is_file() and not list(grid.parent.glob("*.tmp-*"))


def test_resume_redraws_a_grid_of_sample_every_lost_to_a_kill(tmp_path, tiny_idx, monkeypatch):
    """Killed while drawing the step-2 grid (after step 2's checkpoint): the resume draws it from step 2's weights
    before going on, and the run ends as one never killed, grids included."""
    import mpdit.cli.train as train_command
    argv = ["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", "4",
            "--ckpt-every", "2", "--sample-every", "2", "--no-progress"]
    assert main_raise([*argv, "--out", str(tmp_path / "whole")]) == 0
    real = train_command.sample_grid_callback

    def dying_callback(*args, **kwargs):
        def draw(trainer):
            raise KeyboardInterrupt  # the kill, while the grid is drawn
        return draw

    monkeypatch.setattr(train_command, "sample_grid_callback", dying_callback)
    with pytest.raises(KeyboardInterrupt):
        main_raise([*argv, "--out", str(tmp_path / "run")])
    monkeypatch.setattr(train_command, "sample_grid_callback", real)
    assert not (tmp_path / "run" / "samples" / "step-0000002.png").exists()
    assert main_raise(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    for step in (2, 4):
        name = f"samples/step-{step:07d}.png"
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_damaged_checkpoint_names_the_previous_one_and_from_step_resumes(tmp_path, tiny_idx):
    model_cfg, cfg = configs(tiny_idx, steps=12, telemetry_every=0)
    Trainer(tmp_path / "whole", model_cfg, cfg).run()
    run = tmp_path / "run"
    Trainer(run, model_cfg, cfg.__class__(**{**cfg.__dict__, "steps": 8})).run()
    model = run / "checkpoints" / "step-0000008" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # truncated newest model file
    with pytest.raises(MPDiTError, match=r"corrupt or truncated.*previous checkpoint .*step-0000004 is intact: "
                                         r"resume from it with --resume .* --from-step 4"):
        main_raise(["train", "--resume", str(run)])
    (run / "checkpoints" / "step-0000004" / "ema.safetensors").unlink()  # and a missing EMA file there
    with pytest.raises(MPDiTError, match=r"no checkpoint file at .*step-0000004/ema.safetensors"):
        main_raise(["train", "--resume", str(run), "--from-step", "4"])
    with pytest.raises(MPDiTError, match=r"has no checkpoint of step 5 \(it has: 4, 8\)"):
        main_raise(["train", "--resume", str(run), "--from-step", "5"])


def test_from_step_continues_like_an_uninterrupted_run(tmp_path, tiny_idx):
    model_cfg, cfg = configs(tiny_idx, steps=12, telemetry_every=0)
    Trainer(tmp_path / "whole", model_cfg, cfg).run()
    Trainer(tmp_path / "run", model_cfg, cfg).run()
    model = tmp_path / "run" / "checkpoints" / "step-0000012" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    assert main_raise(["train", "--resume", str(tmp_path / "run"), "--from-step", "8", "--no-progress"]) == 0
    whole, again = weights(tmp_path / "whole"), weights(tmp_path / "run")
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert (tmp_path / "run" / "checkpoints" / "step-0000012.discarded").is_dir()  # set aside, not deleted
    assert [e["step"] for e in read_log(tmp_path / "run")] == [2, 4, 6, 8, 10, 12]


# ----------------------------------------------------------------------------- --resume options


def test_resume_refuses_options_that_change_the_run(tmp_path, tiny_idx):
    run = tmp_path / "run"
    assert main_raise(["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", "2",
                       "--no-progress", "--out", str(run)]) == 0
    for given, named in [(["--lr", "0.5"], "--lr"), (["--batch-size", "64"], "--batch-size"),
                         (["--model", "DiT-Micro/4", "--seed", "1"], "--model, --seed"), (["--data", "mnist"], "--data"),
                         (["--out", str(run)], "--out")]:
        with pytest.raises(MPDiTError, match=f"so {named} cannot be given .*allowed with --resume: --steps"):
            main_raise(["train", "--resume", str(run), *given])
    assert main_raise(["train", "--resume", str(run), "--steps", "4", "--log-every", "1", "--ckpt-every", "4",
                       "--keep-checkpoints", "1", "--no-progress"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4]
    assert [e["step"] for e in read_log(run)] == [2, 3, 4]
    with pytest.raises(MPDiTError, match="--from-step goes with --resume"):
        main_raise(["train", "--from-step", "2", "--out", str(tmp_path / "x")])


def test_a_failing_checkpoint_write_names_the_path_and_keeps_the_previous_one(tmp_path, tiny_idx, monkeypatch):
    """A full disk during checkpoint 8, with a cleanup that fails too (a folder gone read-only): one line naming
    the path, the reason and the intact checkpoint; nothing half-written is left under a final name."""
    import errno
    import shutil

    import mpdit.files as files_module
    model_cfg, cfg = configs(tiny_idx, steps=12, telemetry_every=0)
    trainer = Trainer(tmp_path, model_cfg, cfg)
    real_save = files_module.save_file

    def full_disk(tensors, filename, metadata=None):
        if "step-0000008" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    real_unlink, real_rmtree = files_module.Path.unlink, shutil.rmtree

    def read_only(real):
        def remove(path, *args, **kwargs):
            if "step-0000008" in str(path) and os.path.exists(path):
                raise PermissionError(errno.EROFS, "Read-only file system")
            return real(path, *args, **kwargs)
        return remove

    monkeypatch.setattr(files_module, "save_file", full_disk)
    monkeypatch.setattr(files_module.Path, "unlink", read_only(real_unlink))
    monkeypatch.setattr(shutil, "rmtree", read_only(real_rmtree))
    with pytest.raises(MPDiTError, match=r"could not write .*step-0000008 \(No space left on device\); the newest "
                                         r"intact checkpoint is .*step-0000004: free space"):
        trainer.run()
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    Trainer(tmp_path, model_cfg, cfg, resume=True).run()  # and the run goes on from there
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8, 12]


# ----------------------------------------------------------------------------- a real fault: kill -9


# The `mpdit` command with every safetensors write slowed down (a slow disk): each temp file stays 0.15 s
# before it is renamed into place, so a kill lands inside the write.
SLOW_DISK = """import sys, time
import mpdit.files as f
write = f.save_file
f.save_file = lambda *a, **k: (write(*a, **k), time.sleep(0.15))[0]
from mpdit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def kill_during_write(argv, folder, name_glob, timeout=120.0) -> None:
    """Start the slowed `mpdit` with ``argv``; kill -9 it as soon as a temp file or folder matching
    ``folder/name_glob`` exists (a write in progress). Fails if the process ends first."""
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", SLOW_DISK, *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not list(folder.glob(name_glob)):
        assert process.poll() is None, f"ended before the write to kill: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no write to kill"
        time.sleep(0.005)
    process.kill()  # SIGKILL: no cleanup runs
    process.wait()


def compare_runs(a, b) -> None:
    """Model, EMAs, optimizer state, step and snapshots of the newest checkpoints of two runs are identical."""
    ca, cb = ckpt.latest_checkpoint(a), ckpt.latest_checkpoint(b)
    assert ca.name == cb.name
    for name in sorted(p.name for p in ca.glob("*.safetensors")):
        x, y = ckpt.load_safetensors(ca / name), ckpt.load_safetensors(cb / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    sa, sb = ckpt.load_torch(ca / STATE_FILE), ckpt.load_torch(cb / STATE_FILE)
    assert sa["step"] == sb["step"] and sa["power_ema_updates"] == sb["power_ema_updates"]
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    snaps_a, snaps_b = list_snapshots(a), list_snapshots(b)
    assert [(s, sigma) for s, sigma, _ in snaps_a] == [(s, sigma) for s, sigma, _ in snaps_b]
    for (_s, _sigma, pa), (_t, _tau, pb) in zip(snaps_a, snaps_b):
        x, y = ckpt.load_safetensors(pa), ckpt.load_safetensors(pb)
        assert all(torch.equal(x[k], y[k]) for k in x), pa.name


@pytest.mark.slow
def test_kill_9_during_writes_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_idx):
    """kill -9 during the first checkpoint's write, during a later checkpoint's write and between a checkpoint
    and its EMA snapshots; restarting/resuming each time ends with the same model, EMAs, optimizer state and
    snapshots as a run never interrupted, a strict-JSON log without repeated steps and no temp leftovers."""
    from mpdit.cli.main import main
    new = ["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", "16",
           "--ckpt-every", "4", "--log-every", "1", "--t-ref", "50", "--warmup-steps", "2", "--no-progress"]
    assert main([*new, "--out", str(tmp_path / "whole")]) == 0
    run = tmp_path / "run"
    resume = ["train", "--resume", str(run), "--no-progress"]
    kill_during_write([*new, "--out", str(run)], run / "checkpoints", "step-0000004.tmp-*")
    assert not ckpt.list_checkpoints(run)
    with pytest.raises(MPDiTError, match="start it again with --out"):
        main_raise(resume)
    kill_during_write([*new, "--out", str(run)], run / "checkpoints", "step-0000008.tmp-*")
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4]
    kill_during_write(resume, run / "ema_snapshots", "step-0000012-*.tmp-*")
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 8, 12]
    assert len(list((run / "ema_snapshots").glob("step-0000012-*.safetensors"))) < 2  # a snapshot was lost
    assert (run / LOCK_FILE).exists()  # left by the killed process; taken over below
    assert main(resume) == 0
    compare_runs(tmp_path / "whole", run)
    assert [e["step"] for e in strict_log(run)] == list(range(1, 17))
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name] and not (run / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- model bugs (item 13)


def test_eval_weight_cache_follows_replaced_parameters():
    """In eval mode without grad the effective weights are cached; replacing a parameter rather than writing it in
    place (load_state_dict(assign=True), param.data = ..., torch.func.functional_call) must not reuse stale ones."""
    from mpdit.model.dit import build_model
    torch.manual_seed(0)
    model = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=10, mp="all",
                        conditioning="scale-rotation-gate").eval()
    other = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=10, mp="all",
                        conditioning="scale-rotation-gate").eval()
    with torch.no_grad():  # give the zero-init gains some value, so every layer matters
        for m in (model, other):
            for name, p in m.named_parameters():
                if "gain" in name:
                    p.add_(torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        expected, mine = other(x, t, y), model(x, t, y)  # both caches filled
        assert not torch.allclose(expected, mine)
        swapped = {k: v.clone() for k, v in other.state_dict().items()}
        assert torch.allclose(torch.func.functional_call(model, swapped, (x, t, y)), expected)
        assert torch.equal(model(x, t, y), mine)  # and back to its own weights
        for name, p in model.named_parameters():
            p.data = other.get_parameter(name).detach().clone()
        for name, b in model.named_buffers():  # fixed tables (Fourier frequencies...) are not the cached weights
            b.copy_(other.get_buffer(name))
        assert torch.allclose(model(x, t, y), expected)
    model.load_state_dict(dict(build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=10, mp="all",
                                           conditioning="scale-rotation-gate").state_dict()), assign=True)
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), expected)


def test_converter_takes_the_class_count_of_a_dit_without_label_dropout(tmp_path):
    from mpdit.model.convert import infer_config, load_official_checkpoint, to_official
    from mpdit.model.dit import build_model
    no_dropout = build_model("DiT-Nano/2", input_size=8, in_channels=4, num_classes=5, class_dropout_prob=0.0)
    torch.save(to_official(no_dropout.state_dict()), tmp_path / "dit.pt")
    state = torch.load(tmp_path / "dit.pt", weights_only=True)
    assert infer_config(state).num_classes == 4  # the shapes alone read a null class into the 5 rows
    loaded = load_official_checkpoint(tmp_path / "dit.pt", num_classes=5)
    assert loaded.config.num_classes == 5 and loaded.config.class_dropout_prob == 0
    with_dropout = build_model("DiT-Nano/2", input_size=8, in_channels=4, num_classes=5)
    cfg = infer_config(to_official(with_dropout.state_dict()), num_classes=5)
    assert cfg.num_classes == 5 and cfg.class_dropout_prob == 0.1
    with pytest.raises(MPDiTError, match="label table has 5 rows: that is not 7 classes"):
        infer_config(state, num_classes=7)


# ----------------------------------------------------------------------------- bad input: one-line errors


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_idx):
    """A 2-step run (checkpoint, snapshots) to point sample / eval / ema at."""
    folder = tmp_path_factory.mktemp("small_run")
    model_cfg, cfg = configs(tiny_idx, steps=2, ckpt_every=2)
    Trainer(folder, model_cfg, cfg).run()
    return folder


def test_from_pretrained_is_strict(tmp_path):
    from mpdit.model.dit import MPDiT, build_model
    model = build_model("DiT-Nano/4", input_size=8, in_channels=1, num_classes=10)
    model.save_pretrained(tmp_path)
    loaded = MPDiT.from_pretrained(tmp_path)
    assert not loaded.training and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                        model.state_dict().values()))
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [(dict(depth=3), "missing key 'blocks.2"), (dict(depth=None), "lacks the key 'depth'"),
                            (dict(foo=1), "unknown model config key 'foo'"),
                            (dict(depth="2"), "'depth' must be an integer"), (dict(mp=5), "'mp' must be a list of"),
                            (dict(mlp_ratio=[4.0]), "'mlp_ratio' must be a number")]:
        bad = {**config, **change}
        if change.get("depth", 0) is None:
            del bad["depth"]  # no depth key: named (issue 25), not blamed on the blocks the default 12 would want
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(MPDiTError, match=message):
            MPDiT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = ckpt.load_safetensors(tmp_path / "model.safetensors")
    del state["final_layer.linear.weight"]
    ckpt.save_safetensors(tmp_path / "model.safetensors", state)
    from mpdit.pipeline import MPDiTPipeline
    with pytest.raises(MPDiTError, match="missing key 'final_layer.linear.weight'"):
        MPDiTPipeline.from_pretrained_model(str(tmp_path))


@pytest.mark.parametrize("values,message", [
    ({"depth": "2"}, "'depth' must be an integer, got '2'"), ({"mp": 5}, "'mp' must be a list of strings, got 5"),
    ({"hidden_size": 64.5}, "'hidden_size' must be an integer, got 64.5"),
    ({"learn_sigma": "false"}, "'learn_sigma' must be true or false"), ({"depth": 0}, "depth must be an integer >= 1"),
])
def test_model_config_values_are_checked(values, message):
    from mpdit.model.config import DiTConfig
    with pytest.raises(MPDiTError, match=message):
        DiTConfig.from_dict({**DiTConfig.from_preset("DiT-Nano/4").to_dict(), **values})
    with pytest.raises(MPDiTError, match="must come as a JSON object"):
        DiTConfig.from_dict([1, 2])


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "learning rate must be > 0"), (["--betas", "0.9"], "betas must be two numbers"),
    (["--betas", "2,0.9"], "betas must be two numbers"), (["--betas", "a,b"], "--betas takes comma-separated"),
    (["--weight-decay", "-1"], "weight decay must be >= 0"), (["--max-bad-steps", "0"], "max_bad_steps must be >= 1"),
])
def test_bad_training_options(tmp_path, tiny_idx, argv, message):
    with pytest.raises(MPDiTError, match=message):
        main_raise(["train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--steps", "1", "--out", str(tmp_path / "r"),
                    *argv])
    assert not (tmp_path / "r").exists()


def test_grid_rows_are_checked(tmp_path):
    from mpdit.evaluation.ablation import load_grid
    for rows, message in [([], "has no rows"), ([{"name": "a", "lr": "fast"}], "'lr' must be a number"),
                          ([{"name": "a", "seeds": 0}], "seeds must be >= 1")]:
        (tmp_path / "grid.json").write_text(json.dumps(rows))
        with pytest.raises(MPDiTError, match=message):
            load_grid(tmp_path / "grid.json")


@pytest.mark.parametrize("argv,message", [
    (["--num", "0"], "--num must be >= 1"), (["--num", "-3"], "--num must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"), (["--nrow", "-2"], "--nrow must be >= 1"),
    (["--out", "x.jpg"], "--out must end in .png"),
])
def test_sample_counts_are_checked_before_sampling(small_run, tmp_path, monkeypatch, argv, message):
    import mpdit.cli.sample as cli_sample
    monkeypatch.setattr(cli_sample, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(MPDiTError, match=message):
        main_raise(["sample", "--ckpt", str(small_run), "--out", str(tmp_path / "s.png"), *argv])


def test_eval_num_zero_and_other_data(small_run, tmp_path, tiny_idx):
    with pytest.raises(MPDiTError, match="--num must be >= 1"):
        main_raise(["eval", "--ckpt", str(small_run), "--num", "0"])
    with pytest.raises(MPDiTError, match="--data mnist is not the run's own data.*give --out"):
        main_raise(["eval", "--ckpt", str(small_run), "--data", "mnist", "--num", "10"])


def test_ema_refuses_a_checkpoint_as_out_and_steps_past_the_snapshots(small_run, tmp_path):
    step_dir = ckpt.latest_checkpoint(small_run)
    before = (step_dir / "model.safetensors").read_bytes()
    renamed = tmp_path / "my-checkpoint"  # a checkpoint folder under another name
    renamed.mkdir()
    (renamed / STATE_FILE).write_bytes(b"")
    (tmp_path / "other-run" / "checkpoints").mkdir(parents=True)
    for out in (step_dir, renamed, tmp_path / "other-run"):
        with pytest.raises(MPDiTError, match="is a training checkpoint or run"):
            main_raise(["ema", "--run", str(small_run), "--sigma-rel", "0.07", "--out", str(out)])
    assert (step_dir / "model.safetensors").read_bytes() == before
    with pytest.raises(MPDiTError, match=r"step 99999 is past the last EMA snapshot \(step 2\)"):
        main_raise(["ema", "--run", str(small_run), "--sigma-rel", "0.07", "--step", "99999", "--out",
                    str(small_run.parent / "ema-out")])


def test_idx_labels_with_unused_classes_and_empty_class_folders(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import write_idx
    from mpdit.data.datasets import load_dataset
    labels = np.array([0, 1, 2, 255] * 4)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((16, 8, 8), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(MPDiTError, match="labels up to 255 but no image of class 3 .*must be the classes 0..K-1"):
        load_dataset(f"idx:{tmp_path}", "train")
    for name in ("a", "b", "empty"):
        (tmp_path / "folder" / name).mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "folder" / name / "0.png")
    with pytest.raises(MPDiTError, match="class folder .*empty has no readable images"):
        load_dataset(f"folder:{tmp_path / 'folder'}", "train")


def test_export_command_writes_a_loadable_folder_and_refuses_a_checkpoint(small_run, tmp_path, capsys):
    from mpdit.model.dit import MPDiT
    from mpdit.model.hub import read_info
    assert main_raise(["export", "--ckpt", str(small_run), "--out", str(tmp_path / "shared")]) == 0
    assert json.loads(capsys.readouterr().out)["exported"] == str(tmp_path / "shared")
    model = MPDiT.from_pretrained(tmp_path / "shared")
    expected = ckpt.load_safetensors(ckpt.latest_checkpoint(small_run) / "ema-sigma-0.100.safetensors")
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)  # auto: the largest sigma_rel
    assert read_info(tmp_path / "shared")["train_config"]["steps"] == 2
    assert (tmp_path / "shared" / "README.md").is_file()
    with pytest.raises(MPDiTError, match="is a training checkpoint or run"):
        main_raise(["export", "--ckpt", str(small_run), "--out", str(ckpt.latest_checkpoint(small_run))])


# The `mpdit` command with rank 1's loss made NaN at step 3 (its 4th step): a fault on one process only.
ONE_RANK_NAN = """import os, sys
import mpdit.training.train as train
real_step = train.Trainer.train_step
def train_step(self, record):
    if self.step == 3 and os.environ.get("RANK") == "1":
        real_losses = self.objective.training_losses
        self.objective.training_losses = lambda *a, **k: {**(out := real_losses(*a, **k)), "loss": out["loss"] * float("nan")}
        try:
            return real_step(self, record)
        finally:
            self.objective.training_losses = real_losses
    return real_step(self, record)
train.Trainer.train_step = train_step
from mpdit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_ranks_agree_on_a_step_one_rank_found_bad(tmp_path, tiny_idx):
    """2 processes (gloo): a NaN loss on rank 1 alone makes both ranks skip the step (its gradients and the loss
    are all-reduced before the guard looks), so they stay in sync (checked at every checkpoint) and finish."""
    script = tmp_path / "one_rank_nan.py"
    script.write_text(ONE_RANK_NAN)
    env, port = two_process_env()
    run = tmp_path / "run"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          str(script), "train", "--data", tiny_idx, "--model", "DiT-Nano/4", "--batch-size", "16",
                          "--steps", "6", "--ckpt-every", "3", "--log-every", "1", "--no-progress", "--device", "cpu",
                          "--out", str(run)], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, "\n".join(l for l in two.stderr.splitlines() if "Warning" not in l)[-3000:]
    log = strict_log(run)
    assert [e["skipped_steps"] for e in log] == [0, 0, 0, 1, 1, 1] and log[3]["loss"] is None
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3, 6]
