"""`mpdit ablate`: train and evaluate a grid of configurations with equal budget and several seeds,
then write OUT/results.csv and OUT/results.md. Re-run the same command to continue a grid: finished
runs are skipped and interrupted ones resume from their last checkpoint; --report rewrites the results files from
the finished runs alone. SIGTERM or SIGUSR1 (a cluster's
preemption) during training stops the grid after the current step with a checkpoint, with exit status 143 or 75
(docs/cluster.md).

The budget (model, data, steps, evaluation) comes from the options below, over the "budget" of a grid file
({"budget": {...}, "rows": [...]}) where it has one, over the defaults shown.
"""

import argparse
import dataclasses
from dataclasses import replace
from pathlib import Path

from mpdit.cli.numbers import finite_float, finite_floats
from mpdit.errors import MPDiTError, dataclass_from_dict
from mpdit.evaluation.ablation import PRESETS, Budget, load_grid, run_grid, with_lr_sweep
from mpdit.training.preemption import resumed_by

DEFAULTS = Budget()


def ints(text: str) -> tuple[int, ...]:
    """A comma list of integers, e.g. 1000,2000,3000."""
    return tuple(int(x) for x in text.split(","))


def run(args) -> int:
    if (args.preset is None) == (args.grid is None):
        raise MPDiTError("give exactly one of --preset NAME or --grid FILE.json")
    file_budget = {}
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise MPDiTError(f"unknown preset '{args.preset}': choose one of {', '.join(PRESETS)}")
        rows = PRESETS[args.preset](args.main_seeds, args.switch_seeds)
    else:
        rows, file_budget = load_grid(args.grid)
    if args.shared_lr is not None:
        rows = [replace(row, lr=args.shared_lr, schedule=args.shared_schedule) for row in rows]
    if args.lr_sweep:
        rows = with_lr_sweep(rows, list(args.lr_sweep))
    if args.report and args.only:
        raise MPDiTError("give --report or --only, not both: --report trains and evaluates no row")
    if args.report and not (Path(args.out) / "runs").is_dir():
        raise MPDiTError(f"{args.out} holds no runs to report: run the grid first (without --report)")
    only = set() if args.report else set(args.only.split(",")) if args.only else None
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Budget) if getattr(args, f.name) is not None}
    budget = dataclass_from_dict(Budget, {**file_budget, **given}, "budget option")
    with resumed_by("the same mpdit ablate command again"):  # a stop comes after the current run's checkpoint
        best = run_grid(args.out, rows, budget, only=only)
    table = Path(args.out) / "results.md"
    if not best and not table.is_file():
        raise MPDiTError(f"{args.out} holds no finished run of this grid and budget to report: run the grid first")
    print(table.read_text())
    print(f"{len(best)} rows; results in {Path(args.out) / 'results.csv'} and {table}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("ablate", help="run an ablation grid with equal budget and several seeds",
                                   description=__doc__)
    parser.add_argument("--preset", default=None, help=f"named grid: {', '.join(PRESETS)}")
    parser.add_argument("--grid", default=None,
                        help="JSON file: a list of rows {name, mp, conditioning, attention_output, lr, schedule, "
                             "warmup_steps, seeds, timestep_input, objective, time_sampling, logit_mean, logit_std, "
                             "sampler, norm, zero_init, width, precision}, or {budget, rows} (docs/grids/); a name is "
                             "the folder of its runs: 1-100 letters, digits and . _ @ = + - (first a letter or digit), "
                             "distinct ignoring case")
    parser.add_argument("--only", default=None, help="comma list of the rows to train and evaluate; the results "
                        "still report every finished run of the grid in --out")
    parser.add_argument("--report", action="store_true", help="train and evaluate nothing: rewrite the results "
                        "files (results.csv, results.md, plots) from the finished runs in --out")
    parser.add_argument("--out", required=True, help="grid folder")
    parser.add_argument("--model", default=None, help=f"default {DEFAULTS.model}")
    parser.add_argument("--data", default=None, help=f"default {DEFAULTS.data}")
    parser.add_argument("--steps", type=int, default=None, help=f"default {DEFAULTS.steps}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS.batch_size}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row unless the row says (default 1)")
    parser.add_argument("--main-seeds", type=int, default=3, help="paper preset: seeds of the four main rows")
    parser.add_argument("--switch-seeds", type=int, default=1, help="paper preset: seeds of single-switch rows")
    parser.add_argument("--shared-lr", type=finite_float, default=None, help="every row at this lr (a fair check)")
    parser.add_argument("--shared-schedule", choices=["constant", "edm2"], default="constant")
    parser.add_argument("--lr-sweep", type=finite_floats, default=None,
                        help="comma list of lrs: every row at each, best reported")
    parser.add_argument("--t-ref", type=int, default=None, help=f"edm2 rows' t_ref (default {DEFAULTS.t_ref})")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help=f"edm2 rows' warm-up (default {DEFAULTS.warmup_steps})")
    parser.add_argument("--min-snr-gamma", type=finite_float, default=None, help="Min-SNR loss weighting (default 0: off)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default fp32")
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile training and sampling (default off: short runs do not repay it)")
    parser.add_argument("--eval-steps", type=ints, default=None,
                        help="comma list of steps whose checkpoints are also evaluated (default: the final one only)")
    parser.add_argument("--eval-num", type=int, default=None,
                        help=f"samples per evaluation (default {DEFAULTS.eval_num})")
    parser.add_argument("--sampler", default=None, help=f"default {DEFAULTS.sampler}")
    parser.add_argument("--sample-steps", type=int, default=None, help=f"default {DEFAULTS.sample_steps}")
    parser.add_argument("--cfg-scale", "--cfg-scales", dest="cfg_scales", type=finite_floats, default=None,
                        help=f"comma list of guidance scales, each evaluated; each row is reported at its best and at "
                             f"1 when listed (default {DEFAULTS.cfg_scales[0]:g})")
    parser.add_argument("--classifier", default=None, metavar="PATH",
                        help="scoring classifier from `mpdit classifier --data SPEC --out PATH` (default: the packaged "
                             "MNIST one, refused for other data)")
    parser.set_defaults(func=run)
