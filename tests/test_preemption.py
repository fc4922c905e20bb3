"""Preemption (issue 25, item 1): SIGTERM and SIGUSR1 during training finish the step, write a checkpoint, say how
to resume and exit 143 (SIGTERM) or 75 (SIGUSR1); the resumed run is the same, bit for bit, as one never stopped;
`mpdit ablate` likewise; under torchrun every rank stops at the same step."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mpdit.cli.main import main
from mpdit.training import checkpoint as ckpt
from mpdit.training.ema import list_snapshots
from mpdit.training.train import STATE_FILE, Trainer
from conftest import two_process_env
from test_robust import compare_runs, strict_log
from test_train import weights

# `mpdit train` with every step slowed to 0.2 s, so that a signal lands in the middle of the run.
SLOW_STEPS = """import sys, time
from mpdit.training import train
step = train.Trainer.train_step
train.Trainer.train_step = lambda self, record: (time.sleep(0.2), step(self, record))[1]
from mpdit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def tiny_train(data: str, steps: int = 16) -> list[str]:
    return ["train", "--data", data, "--model", "DiT-Nano/4", "--batch-size", "16", "--steps", str(steps),
            "--ckpt-every", "4", "--log-every", "1", "--t-ref", "50", "--warmup-steps", "2", "--no-progress",
            "--device", "cpu"]


def signal_at(monkeypatch, signum, at_step: int) -> None:
    """Make the training process send itself ``signum`` during step ``at_step`` (counted from 1)."""
    original = Trainer.train_step

    def step(self, record):
        if self.step == at_step - 1:
            os.kill(os.getpid(), signum)
        return original(self, record)

    monkeypatch.setattr(Trainer, "train_step", step)


def test_sigterm_to_a_real_train_process_checkpoints_and_resumes_bit_identical(tmp_path, tiny_idx):
    """SIGTERM to a running `mpdit train`: exit 143, one line naming the resume command, a checkpoint at the step
    it reached (not on the run's schedule, without a power-EMA snapshot); resuming ends identical to a run never
    stopped (model, EMAs, optimizer, snapshots, log)."""
    assert main([*tiny_train(tiny_idx), "--out", str(tmp_path / "whole")]) == 0
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *tiny_train(tiny_idx), "--out", str(run)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "log.jsonl").is_file() and len((run / "log.jsonl").read_text().splitlines()) >= 5):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the run did not reach step 5"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("mpdit:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    stopped = ckpt.list_checkpoints(run)[-1][0]
    assert 5 <= stopped < 16 and stopped % 4, stopped  # the step it was in, not a scheduled checkpoint
    assert lines[0] == (f"mpdit: stopped by SIGTERM after step {stopped}: checkpoint "
                        f"{ckpt.checkpoint_dir(run, stopped)}; to go on, run mpdit train --resume {run}")
    assert ckpt.load_torch(ckpt.checkpoint_dir(run, stopped) / STATE_FILE)["stopped_by_signal"] is True
    assert stopped not in {step for step, _, _ in list_snapshots(run)}
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    compare_runs(tmp_path / "whole", run)
    assert [e["step"] for e in strict_log(run)] == list(range(1, 17))


def test_sigusr1_in_process_stops_after_the_step(tmp_path, tiny_idx, monkeypatch, capsys):
    """SIGUSR1 (Slurm's --signal warning) during step 6: the step is finished and checkpointed, exit 75; the
    handlers are put back afterwards; resuming gives the unbroken run."""
    assert main([*tiny_train(tiny_idx, steps=8), "--out", str(tmp_path / "whole")]) == 0
    before = signal.getsignal(signal.SIGUSR1)
    signal_at(monkeypatch, signal.SIGUSR1, at_step=6)
    assert main([*tiny_train(tiny_idx, steps=8), "--out", str(tmp_path / "run")]) == 75
    assert signal.getsignal(signal.SIGUSR1) is before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpdit: stopped by SIGUSR1 after step 6: checkpoint"), err
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4, 6]
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "run")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_a_signal_at_a_scheduled_checkpoint_writes_no_second_one(tmp_path, tiny_idx, monkeypatch):
    signal_at(monkeypatch, signal.SIGTERM, at_step=4)
    assert main([*tiny_train(tiny_idx, steps=8), "--out", str(tmp_path / "run")]) == 143
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4]
    assert not ckpt.load_torch(ckpt.checkpoint_dir(tmp_path / "run", 4) / STATE_FILE)["stopped_by_signal"]
    assert {step for step, _, _ in list_snapshots(tmp_path / "run")} == {4}  # a scheduled checkpoint's snapshot


def test_ablate_stops_after_the_current_runs_checkpoint(tmp_path, tiny_idx, monkeypatch, capsys):
    grid = ["ablate", "--preset", "paper", "--main-seeds", "1", "--only", "dit", "--model", "DiT-Nano/4", "--data",
            tiny_idx, "--steps", "4", "--batch-size", "16", "--eval-num", "20", "--sample-steps", "3",
            "--out", str(tmp_path)]
    signal_at(monkeypatch, signal.SIGTERM, at_step=3)
    assert main(grid) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("; to go on, run the same mpdit ablate command again"), err
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "runs/dit/seed-0")] == [1, 2, 3]
    assert not (tmp_path / "runs/dit/seed-0/records.json").exists()
    monkeypatch.undo()
    assert main(grid) == 0
    assert (tmp_path / "runs/dit/seed-0/records.json").is_file()


# `mpdit train` where rank 1 alone gets SIGTERM during step 4 (as when a node is drained).
RANK_1_SIGTERM = """import os, signal, sys
from mpdit.training import train
step = train.Trainer.train_step
def signalled_step(self, record):
    if self.step == 3 and self.dist.rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, record)
train.Trainer.train_step = signalled_step
from mpdit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_ranks_stop_at_the_same_step(tmp_path, tiny_idx):
    """2 processes (gloo): SIGTERM to rank 1 alone; both ranks stop after the same step (one later than a single
    process would: the flags are all-reduced a step ahead), the checkpoint is written, and resuming in one process
    ends where a run never stopped does (to float rounding: 2 processes sum the batch in another order)."""
    script = tmp_path / "rank_1_sigterm.py"
    script.write_text(RANK_1_SIGTERM)
    env, port = two_process_env()
    args = tiny_train(tiny_idx, steps=8)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          str(script), *args, "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode != 0 and "Traceback" not in two.stdout
    assert "mpdit: stopped by a signal to another rank after step 5" in two.stderr, two.stderr[-3000:]
    assert "mpdit: stopped by SIGTERM after step 5" in two.stderr
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4, 5]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "run")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
