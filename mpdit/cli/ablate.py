"""`mpdit ablate`: train and evaluate a grid of configurations with equal budget and several seeds,
then write OUT/results.csv and OUT/results.md. Re-run the same command to continue a grid: finished
runs are skipped and interrupted ones resume from their last checkpoint.
"""

from dataclasses import replace
from pathlib import Path

from mpdit.diffusion.generate import DEFAULT_CFG_SCALE
from mpdit.errors import MPDiTError
from mpdit.evaluation.ablation import PRESETS, Budget, load_grid, run_grid, with_lr_sweep


def run(args) -> int:
    if (args.preset is None) == (args.grid is None):
        raise MPDiTError("give exactly one of --preset NAME or --grid FILE.json")
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise MPDiTError(f"unknown preset '{args.preset}': choose one of {', '.join(PRESETS)}")
        rows = PRESETS[args.preset](args.main_seeds, args.switch_seeds)
    else:
        rows = load_grid(args.grid)
    if args.only:
        wanted = set(args.only.split(","))
        rows = [row for row in rows if row.name in wanted]
    if args.shared_lr is not None:
        rows = [replace(row, lr=args.shared_lr, schedule=args.shared_schedule) for row in rows]
    if args.lr_sweep:
        rows = with_lr_sweep(rows, [float(x) for x in args.lr_sweep.split(",")])
    budget = Budget(model=args.model, data=args.data, steps=args.steps, batch_size=args.batch_size,
                    seeds=args.seeds, eval_num=args.eval_num, sampler=args.sampler, sample_steps=args.sample_steps,
                    cfg_scale=args.cfg_scale, t_ref=args.t_ref, warmup_steps=args.warmup_steps)
    lines = run_grid(args.out, rows, budget)
    table = Path(args.out) / "results.md"
    print(table.read_text())
    print(f"{len(lines)} rows; results in {Path(args.out) / 'results.csv'} and {table}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("ablate", help="run an ablation grid with equal budget and several seeds",
                                   description=__doc__)
    parser.add_argument("--preset", default=None, help=f"named grid: {', '.join(PRESETS)}")
    parser.add_argument("--grid", default=None, help="JSON file: a list of rows {name, mp, conditioning, lr, "
                                                     "schedule, seeds, timestep_input}")
    parser.add_argument("--only", default=None, help="comma list of row names to run")
    parser.add_argument("--out", required=True, help="grid folder")
    parser.add_argument("--model", default="DiT-Micro/4")
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row unless the row says (default 1)")
    parser.add_argument("--main-seeds", type=int, default=3, help="paper preset: seeds of the four main rows")
    parser.add_argument("--switch-seeds", type=int, default=1, help="paper preset: seeds of single-switch rows")
    parser.add_argument("--shared-lr", type=float, default=None, help="every row at this lr (a fair check)")
    parser.add_argument("--shared-schedule", choices=["constant", "edm2"], default="constant")
    parser.add_argument("--lr-sweep", default=None, help="comma list of lrs: every row at each, best reported")
    parser.add_argument("--t-ref", type=int, default=1000)
    parser.add_argument("--warmup-steps", type=int, default=100, help="edm2 rows' warm-up (default 100)")
    parser.add_argument("--eval-num", type=int, default=500)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=DEFAULT_CFG_SCALE)
    parser.set_defaults(func=run)
