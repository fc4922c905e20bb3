"""The ablation runner: a grid of configurations trained with equal budget and data order, several seeds
each, every run evaluated with `mpdit eval`'s protocol, summarized as results.csv and results.md.

Resumable: a finished run (final checkpoint and eval.json present) is skipped, an interrupted one resumes
from its last checkpoint. Layout: OUT/runs/<row>/seed-<s>/ (a normal training run), OUT/grid.json,
OUT/results.csv, OUT/results.md.
"""

import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from mpdit.cli.eval import evaluate
from mpdit.cli.params import count_params
from mpdit.data.datasets import load_dataset
from mpdit.diffusion.generate import DEFAULT_CFG_SCALE
from mpdit.errors import MPDiTError, dataclass_from_dict
from mpdit.model.config import MP_SWITCHES, DiTConfig, parse_mp
from mpdit.nn.modulation import conditioning_ops
from mpdit.training.checkpoint import list_checkpoints
from mpdit.training.train import TrainConfig, Trainer, family_optimizer, model_config_for_data, read_run_configs

@dataclass
class Row:
    """One configuration of the grid."""

    name: str
    mp: str = "none"
    conditioning: str = "adaln-zero"
    lr: float | None = None  # None: the family's (family_optimizer)
    schedule: str | None = None
    seeds: int | None = None  # None: the grid's default
    timestep_input: str = "log-sigma"

    def __post_init__(self):
        parse_mp(self.mp)
        conditioning_ops(self.conditioning)
        if self.seeds is not None and self.seeds < 1:
            raise MPDiTError(f"seeds must be >= 1 (or left out for the grid's default), got {self.seeds}")

    def optimizer(self) -> dict:
        """The family's optimizer settings (mpdit.training.train.family_optimizer) with this row's overrides."""
        options = family_optimizer(DiTConfig(mp=self.mp))
        if self.lr is not None:
            options["lr"] = self.lr
        if self.schedule is not None:
            options["schedule"] = self.schedule
        return options


def paper_rows(main_seeds: int = 3, switch_seeds: int = 1) -> list[Row]:
    """The paper's comparison: the DiT baseline, three all-MP conditionings, each MP switch alone on the baseline."""
    rows = [Row("dit", "none", "adaln-zero", seeds=main_seeds),
            Row("mp-scale-shift-gate", "all", "scale-shift-gate", seeds=main_seeds),
            Row("mp-scale-rotation-gate", "all", "scale-rotation-gate", seeds=main_seeds),
            Row("mp-rotation", "all", "rotation", seeds=main_seeds)]
    rows += [Row(f"dit+{switch}", switch, "adaln-zero", seeds=switch_seeds) for switch in MP_SWITCHES]
    return rows


PRESETS = {"paper": paper_rows}


def load_grid(path: str | Path) -> list[Row]:
    """Rows from a JSON file: a list of objects with Row's fields (name required)."""
    path = Path(path)
    try:
        items = json.loads(path.read_text())
    except FileNotFoundError:
        raise MPDiTError(f"no grid file at {path}") from None
    except json.JSONDecodeError as error:
        raise MPDiTError(f"grid file {path} is not valid JSON ({error})") from None
    if not isinstance(items, list) or not items:
        raise MPDiTError(f"grid file {path} must hold a non-empty JSON list of rows")
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise MPDiTError(f"grid file {path}, row {i}: each row needs a 'name'")
        try:
            rows.append(dataclass_from_dict(Row, item, "option"))
        except MPDiTError as error:
            raise MPDiTError(f"grid file {path}, row {i}: {error}") from None
    return rows


def with_lr_sweep(rows: list[Row], lrs: list[float]) -> list[Row]:
    """Each row once per learning rate, named ROW@lr=X (the row's own schedule kept)."""
    return [dataclasses.replace(row, name=f"{row.name}@lr={lr:g}", lr=lr) for row in rows for lr in lrs]


@dataclass
class Budget:
    """What every row shares: model size, data, steps, batch, data order (the seed list), evaluation protocol."""

    model: str = "DiT-Micro/4"
    data: str = "mnist"
    steps: int = 1000
    batch_size: int = 64
    seeds: int = 1
    eval_num: int = 500
    sampler: str = "ddim"
    sample_steps: int = 50
    cfg_scale: float = DEFAULT_CFG_SCALE
    t_ref: int = 1000
    warmup_steps: int = 100


def run_dir(out: Path, row: Row, seed: int) -> Path:
    return out / "runs" / row.name / f"seed-{seed}"


def train_and_eval(out: Path, row: Row, seed: int, budget: Budget) -> dict:
    """Train (or resume, or skip) one run, evaluate it once, and return its result record."""
    folder = run_dir(out, row, seed)
    done = list_checkpoints(folder)
    if not done or done[-1][0] < budget.steps:
        data = None
        if done:
            model_cfg, train_cfg = read_run_configs(folder)
        else:
            data = load_dataset(budget.data, "train")
            model_cfg = model_config_for_data(budget.model, data, mp=row.mp,
                                              conditioning=row.conditioning, timestep_input=row.timestep_input)
            train_cfg = TrainConfig(data=budget.data, image_size=model_cfg.input_size, steps=budget.steps,
                                    batch_size=budget.batch_size, seed=seed, t_ref=budget.t_ref,
                                    ckpt_every=max(budget.steps // 4, 1), telemetry_every=max(budget.steps // 20, 1),
                                    log_every=max(budget.steps // 100, 1), progress=False,
                                    **{"warmup_steps": budget.warmup_steps, **row.optimizer()})
        trainer = Trainer(folder, model_cfg, train_cfg, resume=bool(done), data=data)
        print(f"[ablate] {row.name} seed {seed}: training to step {budget.steps} ({'resumed' if done else 'new'})")
        trainer.run()
    eval_path = folder / "eval.json"
    if not eval_path.is_file():
        result = evaluate(folder, num=budget.eval_num, sampler=budget.sampler, steps=budget.sample_steps,
                          cfg_scale=budget.cfg_scale, seed=seed, baseline=False, progress=False)
        eval_path.write_text(json.dumps(result, indent=2))
    result = json.loads(eval_path.read_text())
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    rates = [entry["images_per_s"] for entry in log[1:]] or [log[-1]["images_per_s"]]
    model_cfg, train_cfg = read_run_configs(folder)
    return {"row": row.name, "seed": seed, "mp": row.mp, "conditioning": row.conditioning,
            "lr": train_cfg.lr, "schedule": train_cfg.schedule, "params": count_params(model_cfg),
            "fd_classifier": result["metrics"]["fd_classifier"], "accuracy": result["metrics"]["accuracy"],
            "images_per_s": round(statistics.median(rates), 1), "final_loss": log[-1]["loss"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict], baseline: str) -> list[dict]:
    """One line per row: parameters, FD and accuracy mean and spread over seeds, change against the baseline row."""
    by_row: dict[str, list[dict]] = {}
    for record in records:
        by_row.setdefault(record["row"], []).append(record)
    lines = []
    for name, runs in by_row.items():
        fd, fd_sd = mean_std([r["fd_classifier"] for r in runs])
        acc, acc_sd = mean_std([r["accuracy"] for r in runs])
        lines.append({"row": name, "mp": runs[0]["mp"], "conditioning": runs[0]["conditioning"],
                      "lr": runs[0]["lr"], "schedule": runs[0]["schedule"], "params": runs[0]["params"],
                      "seeds": len(runs), "fd_mean": fd, "fd_std": fd_sd, "acc_mean": acc, "acc_std": acc_sd,
                      "images_per_s": statistics.fmean(r["images_per_s"] for r in runs)})
    base = next((line for line in lines if line["row"] == baseline), None)
    for line in lines:
        line["fd_change_pct"] = None if base is None else 100 * (line["fd_mean"] - base["fd_mean"]) / base["fd_mean"]
        line["params_change_pct"] = None if base is None else 100 * (line["params"] - base["params"]) / base["params"]
    return lines


def mean_and_spread(mean: float, std: float, seeds: int, fmt: str) -> str:
    """'mean ± sd' over seeds; a single seed has no spread to show."""
    return format(mean, fmt) + (f" ± {std:.2g}" if seeds > 1 else "")


def markdown_table(lines: list[dict], budget: Budget, baseline: str) -> str:
    head = (f"{budget.model} on {budget.data}: {budget.steps} steps, batch {budget.batch_size}; "
            f"eval: {budget.eval_num} samples, {budget.sampler} {budget.sample_steps} steps, guidance "
            f"{budget.cfg_scale}; FD = Fréchet distance in the classifier's features (lower is better); "
            f"change against row '{baseline}'.\n\n")
    out = [head, "| row | mp | conditioning | lr | params | seeds | FD (mean ± sd) | FD change | "
                 "accuracy (mean ± sd) | images/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in lines:
        change = "" if x["fd_change_pct"] is None else f"{x['fd_change_pct']:+.1f}%"
        out.append(f"| {x['row']} | {x['mp']} | {x['conditioning']} | {x['lr']:g} {x['schedule']} | "
                   f"{x['params']:,} | {x['seeds']} | {mean_and_spread(x['fd_mean'], x['fd_std'], x['seeds'], '.3g')} | "
                   f"{change} | {mean_and_spread(100 * x['acc_mean'], 100 * x['acc_std'], x['seeds'], '.1f')}% | "
                   f"{x['images_per_s']:.0f} |")
    return "\n".join(out) + "\n"


def best_lr_table(lines: list[dict]) -> str:
    """For swept rows (ROW@lr=X): each row at its best learning rate by FD."""
    best: dict[str, dict] = {}
    for line in lines:
        if "@lr=" in line["row"]:
            base = line["row"].split("@lr=")[0]
            if base not in best or line["fd_mean"] < best[base]["fd_mean"]:
                best[base] = line
    if not best:
        return ""
    out = ["\n### Each row at its best learning rate\n", "| row | best lr | FD (mean ± sd) | accuracy |",
           "|---|---|---|---|"]
    out += [f"| {name} | {x['lr']:g} | {mean_and_spread(x['fd_mean'], x['fd_std'], x['seeds'], '.3g')} | "
            f"{100 * x['acc_mean']:.1f}% |"
            for name, x in best.items()]
    return "\n".join(out) + "\n"


def run_grid(out: str | Path, rows: list[Row], budget: Budget) -> list[dict]:
    """Train and evaluate every (row, seed), skipping finished runs; write results.csv and results.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [row.name for row in rows]
    if len(set(names)) != len(names):
        raise MPDiTError("grid rows need distinct names")
    (out / "grid.json").write_text(json.dumps({"budget": dataclasses.asdict(budget),
                                               "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    records, lines = [], []
    for row in rows:  # results are rewritten after every run, so an unfinished grid shows what it has
        for seed in range(row.seeds or budget.seeds):
            records.append(train_and_eval(out, row, seed, budget))
            lines = write_results(out, records, budget, baseline=names[0])
    return lines


def write_results(out: Path, records: list[dict], budget: Budget, baseline: str) -> list[dict]:
    """OUT/results.csv (one line per run) and OUT/results.md (one line per row); returns the row summaries."""
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    lines = summarize(records, baseline)
    (out / "results.md").write_text(markdown_table(lines, budget, baseline) + best_lr_table(lines))
    return lines
