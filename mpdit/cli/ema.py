"""``mpdit ema``: rebuild the EMA of any sigma_rel from a run's power-function EMA snapshots (EDM2 post-hoc EMA).

    mpdit ema --run RUN_DIR --sigma-rel 0.07 [--step N] --out OUT_DIR

writes OUT_DIR/model.safetensors (the rebuilt weights), OUT_DIR/config.json (copied from RUN_DIR/config.json) and
OUT_DIR/objective.json (the run's training objective), so OUT_DIR loads and samples like a checkpoint directory.
"""

import argparse
from pathlib import Path

from mpdit.cli.numbers import finite_float
from mpdit.diffusion.objectives import OBJECTIVE_FILE
from mpdit.errors import MPDiTError
from mpdit.files import strict_json
from mpdit.training.checkpoint import (CONFIG_FILE, MODEL_FILE, atomic_write_bytes, atomic_write_text,
                                       is_training_folder, objective_config, save_safetensors)
from mpdit.training.ema import SIGMA_REL_MAX, SNAPSHOTS, posthoc_plan, reconstruct
from mpdit.training.outputs import POSTHOC_EMA, refuse_export, refuse_foreign_weights, refuse_run_store


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ema",
        help="rebuild an EMA of any sigma_rel from a run's EMA snapshots (post-hoc EMA)",
        description=f"Rebuild the power-function EMA of any sigma_rel in (0, {SIGMA_REL_MAX:.4f}) at any step up to the "
        f"last snapshot, from RUN_DIR/{SNAPSHOTS}/ (EDM2 sec. 3.2). Writes OUT_DIR/{MODEL_FILE} and OUT_DIR/{CONFIG_FILE}.",
    )
    p.add_argument("--run", required=True, type=Path, metavar="RUN_DIR", help="training run directory")
    p.add_argument("--sigma-rel", required=True, type=finite_float, help="relative EMA width to rebuild, e.g. 0.07")
    p.add_argument("--step", type=int, default=None, help="training step to rebuild at (default: last snapshot)")
    p.add_argument("--out", required=True, type=Path, metavar="OUT_DIR", help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_dir, out_dir = Path(args.run), Path(args.out)
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise MPDiTError(f"no model config at {config}; --run must be a training run directory (it writes {CONFIG_FILE})")
    if out_dir.resolve() == run_dir.resolve():
        raise MPDiTError("--out must be a different directory from --run")
    if is_training_folder(out_dir):
        raise MPDiTError(f"--out {out_dir} is a training checkpoint or run: writing EMA weights there would replace its "
                         "raw weights (and a --resume would continue from them); choose a new folder")
    refuse_run_store(out_dir, "--out")
    refuse_export(out_dir, "--out", "the rebuilt EMA")
    refuse_foreign_weights(out_dir, "--out")
    out_step, plan, fit_error = posthoc_plan(run_dir, args.sigma_rel, args.step)
    weights = reconstruct(run_dir, args.sigma_rel, out_step)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"kind": POSTHOC_EMA, "sigma_rel": repr(args.sigma_rel), "step": out_step, "run": str(run_dir)}
    save_safetensors(out_dir / MODEL_FILE, weights, metadata)
    atomic_write_bytes(out_dir / CONFIG_FILE, config.read_bytes())
    atomic_write_text(out_dir / OBJECTIVE_FILE,
                      strict_json(objective_config(run_dir).to_dict(), "the objective", indent=2))
    print(f"post-hoc EMA sigma_rel={args.sigma_rel:g} at step {out_step} from {len(plan)} snapshots:")
    print(f"  {'step':>9} {'sigma_rel':>9} {'coefficient':>12}")
    for step, sigma_rel, _path, coef in plan:
        print(f"  {step:>9d} {sigma_rel:>9.3f} {coef:>12.6f}")
    print(f"profile fit error (relative L2): {fit_error:.2%}")
    if fit_error > 0.1:
        steps = sorted({step for step, *_ in plan})
        print(f"warning: the snapshots cover this sigma_rel/step poorly; use a snapshot step (last ones: {steps[-3:]}) "
              "or a sigma_rel nearer the tracked ones")
    print(f"wrote {out_dir / MODEL_FILE} ({len(weights)} tensors), {out_dir / CONFIG_FILE} and "
          f"{out_dir / OBJECTIVE_FILE}")
    return 0
