"""`mpdit quickstart`: the main job. Train the default model (DiT-Micro/4, all-MP, scale-rotation-gate) on the
embedded MNIST, write a sample grid, evaluate against the test split, and print where everything is.

Recipe: `mpdit train --min-snr-gamma 5 --lr 3e-2 --steps 4000 --compile --out runs/quickstart` (`mpdit train`'s
defaults plus Min-SNR-5 loss weighting and lr 3e-2 instead of 1e-2); then a 100-image grid and a 1,000-sample
evaluation, both with guidance 6 and the power-EMA weights (sigma_rel 0.10). Every stage is compiled
(torch.compile) where it can be: on CUDA, or on a CPU with a C++ compiler (inductor builds C++ kernels), where
it trains the default model about 1.4x faster after 25-40 s of compiling; --no-compile runs eagerly.

Run it again to go on where it stopped: an interrupted run is continued, a larger --steps continues a finished
run to that many steps (as `mpdit train --resume OUT --steps N`) and then samples and evaluates the new model,
and stages already done for the newest checkpoint are not redone.

What it writes in OUT (default runs/quickstart):
  samples/quickstart.png     the grid: one column per class, power-EMA weights, guidance 6
  samples/quickstart.npz     the grid's images as arrays (ADM layout: arr_0 (N, 28, 28, 3) uint8, labels)
  samples/step-NNNNNNN.png   training's own check at its last step: 2 per class, raw weights, guidance 4
  eval.json                  the metrics and the evaluation protocol
  quickstart.json            which stages are done, for which checkpoint (read when run again)
  log.jsonl, checkpoints/, config.json, train_config.json, ema_snapshots/: the training run (see README)
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from mpdit.cli import eval as eval_command
from mpdit.cli.main import build_parser
from mpdit.errors import MPDiTError
from mpdit.files import strict_json
from mpdit.training.checkpoint import atomic_write_text, latest_checkpoint, list_checkpoints
from mpdit.training.preemption import resumed_by
from mpdit.training.train import read_run_configs

# The main job's recipe: `mpdit train`'s defaults (DiT-Micro/4, all-MP, scale-rotation-gate, batch 64, AdamW with
# the EDM2 schedule) plus Min-SNR-5 loss weighting, which doubled how fast class accuracy rises on MNIST (71% instead
# of 41% at 4,000 steps; docs/results.md), and lr 3e-2 instead of 1e-2: in the 5,000-step grid
# (docs/results/mnist-5k) it passed 94% class accuracy at guidance 6 by step 3,000 on all 3 seeds and 99% by step
# 5,000, where 1e-2 reached 89.8% only at step 5,000 (1e-1 diverged). 4,000 steps, not 3,000: step 3,000 is still
# on the steep part of the curve, where one quickstart run measured 96.3% and another (another thread count) 87.5%,
# which reached 98.4% by step 4,000 (README).
QUICKSTART_STEPS = 4000
QUICKSTART_TRAIN_OPTIONS = ["--min-snr-gamma", "5", "--lr", "3e-2"]
# Guidance of the grid and the evaluation: 6 scored better than 4 in accuracy and FD at 2,000 and 4,000 steps.
QUICKSTART_CFG_SCALE = 6.0
STAGES_FILE = "quickstart.json"
# Training throughput of the recipe measured on 2 quiet CPU cores (README), eager and compiled, for the estimate
# printed at start.
QUIET_IMAGES_PER_S = {False: 277, True: 395}
BATCH_SIZE = 64  # `mpdit train`'s default, which the recipe keeps


def duration(seconds: float) -> str:
    """Seconds as people read them: '9 s', '2 min 09 s', '1 h 02 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def estimate(steps: int, compiled: bool) -> str:
    """How long `steps` training steps of the recipe took on 2 quiet CPU cores, in words."""
    minutes = steps * BATCH_SIZE / QUIET_IMAGES_PER_S[compiled] / 60
    return f"about {round(minutes)} min on 2 quiet CPU cores" if minutes >= 1 else "under a minute on 2 quiet CPU cores"


def can_compile() -> bool:
    """Whether torch.compile can build kernels here: on CUDA, or on a CPU with the C++ compiler inductor calls
    ($CXX, else g++)."""
    return torch.cuda.is_available() or shutil.which(os.environ.get("CXX", "g++")) is not None


def training_plan(out: Path, steps: int | None, seed: int = 0,
                  compiled: bool = False) -> tuple[list[str] | None, str]:
    """The `mpdit train` arguments that bring OUT to the wanted steps (None: nothing to train) and a line saying so.
    ``steps`` None: the run's own target, or QUICKSTART_STEPS for a new run."""
    checkpoints = list_checkpoints(out)
    compile_option = "--compile" if compiled else "--no-compile"
    if not checkpoints:
        steps = QUICKSTART_STEPS if steps is None else steps
        return (["train", "--out", str(out), "--steps", str(steps), "--seed", str(seed), compile_option,
                 *QUICKSTART_TRAIN_OPTIONS],
                f"training the default model for {steps:,} steps in {out} ({estimate(steps, compiled)})")
    done = checkpoints[-1][0]
    run_cfg = read_run_configs(out)[1]
    target = run_cfg.steps if steps is None else steps
    if target > done and seed != run_cfg.seed:
        raise MPDiTError(f"{out} trains with seed {run_cfg.seed}: continuing it cannot apply --seed {seed}; give "
                         f"--seed {run_cfg.seed}, or another --out for a run of seed {seed}")
    if target < done:
        raise MPDiTError(f"{out} is already trained to {done:,} steps: --steps {target} cannot go back; "
                         f"give --steps {done} or more, or another --out")
    if target == done:
        return None, f"{out} is already trained to {done:,} steps (a larger --steps continues it)"
    return (["train", "--resume", str(out), "--steps", str(target), compile_option],
            f"continuing {out} from step {done:,} to {target:,} ({estimate(target - done, compiled)})")


def run(args) -> int:
    out = Path(args.out)
    parser = build_parser()
    quiet = ["--no-progress"] if args.no_progress else []
    # With --json the stages' own lines go to stderr, so that stdout holds the one JSON object.
    stage_output = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    compiled = can_compile() if args.compile is None else args.compile
    train_argv, plan = training_plan(out, args.steps, args.seed, compiled)
    print(f"mpdit quickstart: {plan}", file=sys.stderr if args.json else sys.stdout)
    started = time.perf_counter()
    timings = {}
    if train_argv is not None:
        train_args = parser.parse_args(train_argv + quiet)
        with stage_output, resumed_by("the same mpdit quickstart command again"):
            train_args.func(train_args)
        timings["train_s"] = round(time.perf_counter() - started, 1)
    checkpoint = latest_checkpoint(out)
    stages_path = out / STAGES_FILE
    try:
        stages = json.loads(stages_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # no record (or an unreadable one): every stage is run
        stages = {}

    def stage(name: str, inputs: dict, outputs: list[Path], work) -> None:
        """Run `work` unless the record says it is done with the same inputs and its outputs exist."""
        if stages.get(name) == inputs and all(path.is_file() for path in outputs):
            return
        mark = time.perf_counter()
        with stage_output:
            work()
        timings[f"{name}_s"] = round(time.perf_counter() - mark, 1)
        stages[name] = inputs
        atomic_write_text(stages_path, strict_json(stages, "the stage record", indent=2))

    grid = out / "samples" / "quickstart.png"
    common = {"checkpoint": str(checkpoint), "seed": args.seed, "cfg_scale": QUICKSTART_CFG_SCALE}
    sample_args = parser.parse_args(["sample", "--ckpt", str(out), "--num", str(args.grid_num), "--out", str(grid),
                                     "--seed", str(args.seed), "--cfg-scale", str(QUICKSTART_CFG_SCALE),
                                     "--compile" if compiled else "--no-compile", *quiet])
    stage("sample", {**common, "num": args.grid_num}, [grid, grid.with_suffix(".npz")],
          lambda: sample_args.func(sample_args))

    metric_path = out / "eval.json"

    def evaluate() -> None:
        result = eval_command.evaluate(out, num=args.eval_num, seed=args.seed, cfg_scale=QUICKSTART_CFG_SCALE,
                                       progress=not args.no_progress, compile_model=compiled)
        atomic_write_text(metric_path, strict_json(result, "the evaluation", indent=2))

    stage("eval", {**common, "num": args.eval_num}, [metric_path], evaluate)
    result = json.loads(metric_path.read_text())
    files = {"checkpoint": str(checkpoint), "grid": str(grid), "grid_arrays": str(grid.with_suffix(".npz")),
             "training_log": str(out / "log.jsonl"), "metrics": str(metric_path)}
    if args.json:
        print(strict_json({"run": str(out), **files, "timings": timings, **result}, "the report"))
        return 0
    done = {"train_s": "training", "sample_s": "grid", "eval_s": "evaluation"}
    spent = ", ".join(f"{label} {duration(timings[key])}" for key, label in done.items() if key in timings)
    skipped = [label for key, label in done.items() if key not in timings]
    print("\n".join([
        "", "mpdit quickstart: done", *eval_command.summary_lines(result),
        f"  time: {duration(time.perf_counter() - started)}" + (f" ({spent})" if spent else "")
        + (f"; already done before, not redone: {', '.join(skipped)}" if skipped else ""),
        f"  checkpoint:   {checkpoint}",
        f"  sample grid:  {grid} (one column per class; its images as arrays in {grid.with_suffix('.npz').name})",
        f"  training log: {out / 'log.jsonl'} (and {out / 'samples'}/step-*.png: training's own check, raw weights)",
        f"  metrics:      {metric_path}"]))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("quickstart", help="train, sample and evaluate the default model on MNIST",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="run folder (default runs/quickstart)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default {QUICKSTART_STEPS}, {estimate(QUICKSTART_STEPS, True)} "
                             "compiled; an existing run: its own, or continue it to N)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile training and sampling (default: where it can, on CUDA or with a C++ "
                             "compiler)")
    parser.add_argument("--grid-num", type=int, default=100, help="images in the sample grid (default 100)")
    parser.add_argument("--eval-num", type=int, default=1000, help="samples to evaluate (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, grid and evaluation (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object at the end (files, timings, metrics, protocol); stages' lines "
                             "go to stderr")
    parser.set_defaults(func=run, cpu_heavy=True)
