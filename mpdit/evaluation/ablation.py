"""The ablation runner: a grid of configurations trained with equal budget and data order, several seeds
each, every run evaluated with `mpdit eval`'s protocol, summarized as results.csv and results.md.

Each run is evaluated at every step of ``Budget.eval_steps`` and at its final step, at every guidance scale of
``Budget.cfg_scales``; results.md reports each row at guidance 1 (when evaluated) and at its best guidance (the
scale with the lowest mean FD over seeds), at the final step and as curves over the evaluated steps, with the
change against the first row and the number of standard errors between them.

Resumable: a trained run (checkpoint at the budget's steps) is not trained again, an interrupted one resumes
from its last checkpoint, an evaluation already written with the budget's protocol is not redone. Layout:
OUT/runs/<row>/seed-<s>/ (a normal training run; its evaluations in checkpoints/step-N/eval-cfgG.json, all of
them together in records.json: a run whose records.json holds the budget's protocol is done, so OUT without
its checkpoints/ and ema_snapshots/ folders carries a grid's finished runs to another machine or session; a run
stopped by the divergence guard is finished too, evaluated at the steps it reached and listed as diverged; each
evaluated step also has its validation loss, CHECKPOINT/val-loss.json, a column of the CSV and the tables, missing
for runs recorded before it existed),
OUT/grid.json (budget and rows: itself a grid file), OUT/results.csv (one line per run, step and guidance),
OUT/results.md, with several evaluated steps OUT/curves.png, and for rows named FAMILY-wWIDTH@lr=LR the
learning-rate transfer across widths (mpdit.evaluation.transfer: a section of results.md and OUT/lr-transfer.png),
all rewritten after each run.
"""

import csv
import dataclasses
import io
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from mpdit.data.datasets import load_dataset
from mpdit.diffusion.generate import DEFAULT_CFG_SCALE
from mpdit.diffusion.objectives import OBJECTIVES, ObjectiveConfig
from mpdit.errors import MPDiTError, dataclass_from_dict, require_field_types
from mpdit.evaluation.classifier import NO_CLASSIFIER, classifier_name
from mpdit.evaluation.evaluate import evaluate, evaluate_loss
from mpdit.evaluation.transfer import (best_lr_markdown, loss_per_width_markdown, plot_transfer, scored_points, swept,
                                       tuned_narrow_markdown)
from mpdit.files import read_json, read_json_lines, strict_json
from mpdit.model.config import (MP_SWITCHES, ZERO_INIT, DiTConfig, attention_output_setting, parse_mp,
                                width_overrides)
from mpdit.model.dit import count_params
from mpdit.nn.modulation import conditioning_ops
from mpdit.training.checkpoint import atomic_write_text, list_checkpoints
from mpdit.training.train import (TrainConfig, Trainer, TrainingDiverged, family_optimizer, model_config_for_data,
                                  read_run_configs)

# A row's name is the folder of its runs (OUT/runs/NAME/seed-S): one path component, of these characters only.
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@=+-]{0,99}")


def check_row_name(name: str) -> None:
    """MPDiTError unless ``name`` is a safe folder name (ROW_NAME): no separators, no '..', no NUL, not empty."""
    if not ROW_NAME.fullmatch(name):
        raise MPDiTError(f"grid row name {name!r} must be one folder name: 1 to 100 letters, digits and . _ @ = + - "
                         "(first a letter or digit), e.g. dit-warmup@lr=0.003")


def require_distinct_names(names: list[str]) -> None:
    """MPDiTError naming two rows whose names are one folder on a case-insensitive file system (or equal)."""
    seen = {}
    for name in names:
        if name.casefold() in seen:
            raise MPDiTError(f"grid rows '{seen[name.casefold()]}' and '{name}' would share one folder (names are "
                             "compared ignoring case, as some file systems do): give each row its own name")
        seen[name.casefold()] = name


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
    attention_output: str = "normalized"  # plain: the paper's exact cosine attention (mpdit train --attention-output)
    warmup_steps: int | None = None  # None: the family's (DiT 0; MP the budget's)
    # the objective (mpdit train --objective and its flow options) and the evaluation's sampler (None: the budget's)
    objective: str = "ddpm"
    time_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sampler: str | None = None
    norm: str = "layernorm"  # or dyt (mpdit train --norm)
    zero_init: str | None = None  # on or off; None: the model's default (off for norm dyt)
    width: int | None = None  # hidden size instead of the budget model's, with heads of dimension HEAD_DIM
    precision: str | None = None  # fp32 or bf16 (autocast) for this row's training; None: the budget's

    def __post_init__(self):
        require_field_types(self, "option")
        check_row_name(self.name)
        conditioning_ops(self.conditioning)
        attention_output_setting(self.attention_output, parse_mp(self.mp))
        if self.seeds is not None and self.seeds < 1:
            raise MPDiTError(f"seeds must be >= 1 (or left out for the grid's default), got {self.seeds}")
        if self.precision not in (None, "fp32", "bf16"):
            raise MPDiTError(f"unknown precision '{self.precision}': choose fp32 or bf16 (or leave it out)")
        if self.zero_init not in ZERO_INIT:
            raise MPDiTError(f"zero_init must be on or off (or left out), got {self.zero_init!r}")
        objective = ObjectiveConfig(**self.objective_options(), sigma_data=1.0)  # a known objective, good options
        OBJECTIVES[objective.objective](objective, DiTConfig(**self.model_overrides()))  # and a model that fits it

    def model_overrides(self) -> dict:
        """The DiTConfig fields this row sets (besides the budget's model and the data's shape)."""
        return dict(mp=self.mp, conditioning=self.conditioning, timestep_input=self.timestep_input,
                    normalize_attention_output=attention_output_setting(self.attention_output, self.mp),
                    norm=self.norm, zero_init=ZERO_INIT[self.zero_init],
                    learn_sigma=OBJECTIVES[self.objective].learn_sigma, **width_overrides(self.width))

    def objective_options(self) -> dict:
        """The TrainConfig fields of this row's objective."""
        return dict(objective=self.objective, time_sampling=self.time_sampling, logit_mean=self.logit_mean,
                    logit_std=self.logit_std)

    def eval_sampler(self, budget: "Budget") -> str:
        """The sampler this row is evaluated with: its own, else the budget's; one line if its objective has none
        of that name, or if the budget's loss weighting does not apply to it."""
        if budget.min_snr_gamma and not OBJECTIVES[self.objective].min_snr:
            raise MPDiTError(f"grid row {self.name}: the budget's Min-SNR weighting is DDPM's; a {self.objective} row "
                             "trains with plain MSE: put it in a grid whose budget has min_snr_gamma 0")
        sampler = self.sampler or budget.sampler
        if sampler not in OBJECTIVES[self.objective].samplers:
            raise MPDiTError(f"grid row {self.name}: sampler '{sampler}' is not a {self.objective} sampler: give the "
                             f"row (or the budget) one of {', '.join(OBJECTIVES[self.objective].samplers)}")
        return sampler

    def optimizer(self) -> dict:
        """The family's optimizer settings (mpdit.training.train.family_optimizer) with this row's overrides."""
        options = family_optimizer(DiTConfig(mp=self.mp))
        for key in ("lr", "schedule", "warmup_steps"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
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


def load_grid(path: str | Path) -> tuple[list[Row], dict]:
    """Rows and budget options from a JSON file: a list of rows (objects with Row's fields, name required), or
    {"budget": {Budget's fields}, "rows": [...], "comment": "..."} (OUT/grid.json is written in that form)."""
    path = Path(path)
    try:
        items = read_json(path, "grid file")
    except FileNotFoundError:
        raise MPDiTError(f"no grid file at {path}") from None
    budget = {}
    if isinstance(items, dict):
        unknown = sorted(set(items) - {"budget", "rows", "comment"})
        if unknown:
            raise MPDiTError(f"grid file {path}: unknown key '{unknown[0]}' (a grid object holds 'budget', 'rows' "
                             "and an optional 'comment')")
        items, budget = items.get("rows"), items.get("budget", {})
        if not isinstance(budget, dict):
            raise MPDiTError(f"grid file {path}: 'budget' must be an object of budget options")
    if not isinstance(items, list):
        raise MPDiTError(f"grid file {path} must hold a JSON list of rows or an object with 'budget' and 'rows'")
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise MPDiTError(f"grid file {path}, row {i}: each row needs a 'name'")
        try:
            rows.append(dataclass_from_dict(Row, item, "option"))
        except MPDiTError as error:
            raise MPDiTError(f"grid file {path}, row {i}: {error}") from None
    try:
        dataclass_from_dict(Budget, budget, "budget option")
    except MPDiTError as error:
        raise MPDiTError(f"grid file {path}: {error}") from None
    if not rows:
        raise MPDiTError(f"grid file {path} has no rows: give at least one")
    return rows, budget


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
    cfg_scales: tuple[float, ...] = (DEFAULT_CFG_SCALE,)  # each run is evaluated at each
    eval_steps: tuple[int, ...] = ()  # checkpoints evaluated besides the final one
    t_ref: int = 1000
    warmup_steps: int = 100  # edm2 rows' warm-up
    min_snr_gamma: float = 0.0
    precision: str = "fp32"
    classifier: str | None = None  # weights of `mpdit classifier`; None: the packaged MNIST classifier
    device: str = "auto"
    compile: bool = False  # torch.compile training and sampling; off: short runs and many evaluations don't repay it

    def __post_init__(self):
        require_field_types(self, "budget option")
        self.cfg_scales = tuple(float(g) for g in self.cfg_scales)
        self.eval_steps = tuple(int(s) for s in self.eval_steps)
        if self.steps < 1 or not self.cfg_scales or min(self.cfg_scales) < 0:
            raise MPDiTError("the budget needs steps >= 1 and at least one guidance scale >= 0")
        if self.classifier == NO_CLASSIFIER:
            raise MPDiTError("the grid ranks rows by the classifier's FD: give a classifier, not 'none'")
        outside = [s for s in self.eval_steps if not 0 < s <= self.steps]
        if outside:
            raise MPDiTError(f"eval step {outside[0]} is outside 1..{self.steps} (the budget's steps)")

    @property
    def evaluated_steps(self) -> list[int]:
        """The eval steps and the final step, sorted."""
        return sorted(set(self.eval_steps) | {self.steps})


def run_dir(out: Path, row: Row, seed: int) -> Path:
    return out / "runs" / row.name / f"seed-{seed}"


def train_run(folder: Path, row: Row, seed: int, budget: Budget) -> None:
    """Train one run to the budget's steps: new, resumed from its last checkpoint, or left alone when done.

    Checkpoints are kept at every evaluated step (every gcd of them; every quarter of the run with none).
    """
    done = list_checkpoints(folder)
    if done and done[-1][0] >= budget.steps:
        return
    data = None
    if done:
        model_cfg, train_cfg = read_run_configs(folder)
        train_cfg.steps, train_cfg.device, train_cfg.compile = budget.steps, budget.device, budget.compile
    else:
        data = load_dataset(budget.data, "train")
        model_cfg = model_config_for_data(budget.model, data, **row.model_overrides())
        steps = budget.evaluated_steps
        train_cfg = TrainConfig(data=budget.data, image_size=model_cfg.input_size, steps=budget.steps,
                                batch_size=budget.batch_size, seed=seed, t_ref=budget.t_ref,
                                min_snr_gamma=budget.min_snr_gamma, precision=row.precision or budget.precision,
                                device=budget.device, compile=budget.compile,
                                ckpt_every=math.gcd(*steps) if len(steps) > 1 else max(budget.steps // 4, 1),
                                keep_checkpoints=0, telemetry_every=max(budget.steps // 20, 1),
                                log_every=max(budget.steps // 100, 1), progress=False, **row.objective_options(),
                                **{"warmup_steps": budget.warmup_steps, **row.optimizer()})
    trainer = Trainer(folder, model_cfg, train_cfg, resume=bool(done), data=data)
    print(f"[ablate] {row.name} seed {seed}: training to step {budget.steps} ({'resumed' if done else 'new'})",
          flush=True)
    trainer.run()


def evaluation(checkpoint: Path, cfg_scale: float, seed: int, budget: Budget, sampler: str) -> dict:
    """The eval result of one checkpoint at one guidance scale with ``sampler``: CHECKPOINT/eval-cfgG.json when it
    holds the budget's protocol and classifier, else evaluated now and written there."""
    path = checkpoint / f"eval-cfg{cfg_scale:g}.json"
    wanted = {"num_samples": budget.eval_num, "sampler": sampler, "steps": budget.sample_steps,
              "cfg_scale": cfg_scale, "seed": seed}
    if path.is_file():
        result = json.loads(path.read_text())
        protocol = result["protocol"]
        scorer = (protocol.get("classifier") or {}).get("weights")
        same_scorer = scorer == classifier_name(budget.classifier)
        if same_scorer and {key: protocol.get(key) for key in wanted} == wanted:
            return result
    result = evaluate(checkpoint, num=budget.eval_num, sampler=sampler, steps=budget.sample_steps,
                      cfg_scale=cfg_scale, seed=seed, device=budget.device, baseline=False, progress=False,
                      classifier=budget.classifier, compile_model=budget.compile)
    atomic_write_text(path, strict_json(result, f"the evaluation {path}", indent=2))
    return result


def validation(checkpoint: Path, budget: Budget) -> float:
    """The validation loss of one checkpoint (`mpdit eval --loss` with its default seed 0, so every run of every
    seed is scored on the same images and noise; the weights the FD is scored with): CHECKPOINT/val-loss.json when
    it holds seed 0, else computed now and written there."""
    path = checkpoint / "val-loss.json"
    if path.is_file():
        result = json.loads(path.read_text())
        if result["protocol"]["validation_loss"]["seed"] == 0:
            return result["metrics"]["val_loss"]
    result = evaluate_loss(checkpoint, seed=0, device=budget.device)
    atomic_write_text(path, strict_json(result, "the validation loss", indent=2))
    return result["metrics"]["val_loss"]


def records_protocol(budget: Budget, sampler: str) -> dict:
    """What a run's records.json must match to stand for this budget's evaluation of the run with ``sampler``.
    (The validation loss is not part of it: records written before it existed stay finished, without it.)"""
    return {"steps": budget.steps, "evaluated_steps": budget.evaluated_steps, "cfg_scales": list(budget.cfg_scales),
            "eval_num": budget.eval_num, "sampler": sampler, "sample_steps": budget.sample_steps,
            "classifier": classifier_name(budget.classifier)}


def finished_run(folder: Path, budget: Budget, sampler: str) -> dict | None:
    """RUN/records.json when it holds this budget's protocol (the run is done), else None: {"records": [...]}, and
    for a run that diverged {"diverged": {"step": N}} too."""
    path = folder / "records.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("protocol") == records_protocol(budget, sampler) else None


def evaluate_run(folder: Path, row: Row, seed: int, budget: Budget, diverged_at: int | None = None) -> dict:
    """One result record per evaluated step and guidance scale of a trained run, as finished_run gives them, also
    written to RUN/records.json. A run that diverged at step `diverged_at` is evaluated at the steps it reached."""
    model_cfg, train_cfg = read_run_configs(folder)
    log = read_json_lines(folder / "log.jsonl", "training log")
    rates = [entry["images_per_s"] for entry in log[1:]] or [log[-1]["images_per_s"]]
    checkpoints = dict(list_checkpoints(folder))
    steps = budget.evaluated_steps if diverged_at is None else [s for s in budget.evaluated_steps if s in checkpoints]
    sampler = row.eval_sampler(budget)
    records = []
    for step in steps:
        if step not in checkpoints:
            raise MPDiTError(f"{folder} has no checkpoint at step {step} to evaluate (it kept "
                             f"{', '.join(map(str, checkpoints)) or 'none'}): evaluate steps it kept, or train anew")
        val_loss = validation(checkpoints[step], budget)
        for cfg_scale in budget.cfg_scales:
            result = evaluation(checkpoints[step], cfg_scale, seed, budget, sampler)
            records.append({
                "row": row.name, "seed": seed, "mp": row.mp, "conditioning": row.conditioning,
                "attention_output": row.attention_output, "lr": train_cfg.lr, "schedule": train_cfg.schedule,
                "params": count_params(model_cfg), "step": step, "cfg_scale": cfg_scale,
                "fd_classifier": result["metrics"]["fd_classifier"], "accuracy": result["metrics"]["accuracy"],
                "images_per_s": round(statistics.median(rates), 1),
                "loss": next((entry["loss"] for entry in reversed(log) if entry["step"] <= step), None),
                "classifier": result["protocol"]["classifier"]["weights"], "objective": row.objective,
                "norm": row.norm, "width": model_cfg.hidden_size, "val_loss": val_loss})
    run = {"protocol": records_protocol(budget, sampler), "records": records}
    if diverged_at is not None:
        run["diverged"] = {"step": diverged_at}
    atomic_write_text(folder / "records.json", strict_json(run, f"the records of {folder}", indent=1))
    return run


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict]) -> list[dict]:
    """One line per (row, step, guidance): FD and accuracy mean and spread over seeds, and the row's settings."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["row"], record["step"], record["cfg_scale"]), []).append(record)
    lines = []
    for runs in groups.values():
        fd, fd_sd = mean_std([r["fd_classifier"] for r in runs])
        acc, acc_sd = mean_std([r["accuracy"] for r in runs])
        val = [r["val_loss"] for r in runs]
        settings = ("row", "mp", "conditioning", "attention_output", "lr", "schedule", "params", "step", "cfg_scale",
                    "objective", "norm", "width")
        lines.append({**{key: runs[0][key] for key in settings}, "seeds": len(runs), "fd_mean": fd, "fd_std": fd_sd,
                      "acc_mean": acc, "acc_std": acc_sd,
                      "val_loss": None if None in val else statistics.fmean(val),
                      "images_per_s": statistics.fmean(r["images_per_s"] for r in runs)})
    return lines


def with_record_defaults(records: list[dict], budget: Budget) -> list[dict]:
    """Records with the fields added after a grid's first runs filled in for the runs written before them (DDPM,
    LayerNorm, the budget model's width, no validation loss), so old and new runs share one CSV and table."""
    defaults = {"objective": "ddpm", "norm": "layernorm", "width": DiTConfig.from_preset(budget.model).hidden_size,
                "val_loss": None}
    return [{**defaults, **record} for record in records]


def best_guidance(lines: list[dict]) -> list[dict]:
    """Per (row, step), the line of the guidance scale with the lowest mean FD."""
    best: dict[tuple, dict] = {}
    for line in lines:
        key = (line["row"], line["step"])
        if key not in best or line["fd_mean"] < best[key]["fd_mean"]:
            best[key] = line
    return list(best.values())


def standard_errors_apart(line: dict, base: dict) -> float | None:
    """(mean FD of line - mean FD of base) / the standard error of that difference; None under 2 seeds each."""
    if line["seeds"] < 2 or base["seeds"] < 2:
        return None
    error = math.sqrt(line["fd_std"] ** 2 / line["seeds"] + base["fd_std"] ** 2 / base["seeds"])
    return (line["fd_mean"] - base["fd_mean"]) / error if error > 0 else None


def against_baseline(lines: list[dict], baseline: str) -> list[dict]:
    """Copies of the lines with FD and parameter change (%) and standard errors apart against the baseline row's
    line at the same step (None where the baseline has none)."""
    base = {line["step"]: line for line in lines if line["row"] == baseline}
    out = []
    for line in lines:
        b = base.get(line["step"])
        out.append({**line,
                    "fd_change_pct": None if b is None else 100 * (line["fd_mean"] - b["fd_mean"]) / b["fd_mean"],
                    "params_change_pct": None if b is None else 100 * (line["params"] - b["params"]) / b["params"],
                    "fd_sigmas": None if b is None else standard_errors_apart(line, b)})
    return out


def mean_and_spread(mean: float, std: float, seeds: int, fmt: str) -> str:
    """'mean ± sd' over seeds; a single seed has no spread to show."""
    return format(mean, fmt) + (f" ± {std:.2g}" if seeds > 1 else "")


def model_label(line: dict) -> str:
    return (line["mp"] + (", plain attention output" if line["attention_output"] == "plain" else "")
            + (", DyT" if line["norm"] == "dyt" else "") + (f", {line['objective']}" if line["objective"] != "ddpm"
                                                             else ""))


def markdown_table(lines: list[dict]) -> str:
    """One line per row: settings, FD and accuracy (mean ± sd over seeds), change against the baseline."""
    out = ["| row | mp | conditioning | lr | params | seeds | guidance | FD (mean ± sd) | FD change | SEs apart | "
           "accuracy (mean ± sd) | val loss | images/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in lines:
        change = "" if x["fd_change_pct"] is None else f"{x['fd_change_pct']:+.1f}%"
        sigmas = "" if x["fd_sigmas"] is None else f"{x['fd_sigmas']:+.1f}"
        out.append(f"| {x['row']} | {model_label(x)} | {x['conditioning']} | {x['lr']:g} {x['schedule']} | "
                   f"{x['params']:,} | {x['seeds']} | {x['cfg_scale']:g} | "
                   f"{mean_and_spread(x['fd_mean'], x['fd_std'], x['seeds'], '.3g')} | {change} | {sigmas} | "
                   f"{mean_and_spread(100 * x['acc_mean'], 100 * x['acc_std'], x['seeds'], '.1f')}% | "
                   f"{'' if x['val_loss'] is None else format(x['val_loss'], '.4f')} | {x['images_per_s']:.0f} |")
    return "\n".join(out) + "\n"


def curves_table(lines: list[dict], steps: list[int], title: str, show_guidance: bool) -> str:
    """Rows x evaluated steps: 'FD / accuracy' (mean over seeds; with show_guidance, the guidance in brackets)."""
    by_row: dict[str, dict[int, dict]] = {}
    for line in lines:
        by_row.setdefault(line["row"], {})[line["step"]] = line
    out = [f"\n### {title}\n", "| row | " + " | ".join(f"step {s:,}" for s in steps) + " |",
           "|---|" + "---|" * len(steps)]
    for name, at in by_row.items():
        cells = [f"{at[s]['fd_mean']:.3g} / {100 * at[s]['acc_mean']:.1f}%"
                 + (f" (g {at[s]['cfg_scale']:g})" if show_guidance else "") if s in at else "" for s in steps]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
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
    out = ["\n### Each row at its best learning rate\n", "| row | best lr | guidance | FD (mean ± sd) | accuracy |",
           "|---|---|---|---|---|"]
    out += [f"| {name} | {x['lr']:g} | {x['cfg_scale']:g} | "
            f"{mean_and_spread(x['fd_mean'], x['fd_std'], x['seeds'], '.3g')} | {100 * x['acc_mean']:.1f}% |"
            for name, x in best.items()]
    return "\n".join(out) + "\n"


def results_markdown(lines: list[dict], budget: Budget, baseline: str) -> tuple[str, list[dict]]:
    """results.md's text, and the final step's lines at each row's best guidance (compared with the baseline)."""
    scales = ", ".join(f"{g:g}" for g in budget.cfg_scales)
    head = (f"{budget.model} on {budget.data}: {budget.steps} steps, batch {budget.batch_size}"
            f"{f', Min-SNR-{budget.min_snr_gamma:g}' if budget.min_snr_gamma else ''}, {budget.precision}; "
            f"eval: {budget.eval_num} samples, {budget.sampler} {budget.sample_steps} steps, guidance {scales}, "
            f"at steps {', '.join(map(str, budget.evaluated_steps))}; FD = Fréchet distance in the classifier's "
            f"features (lower is better); change against row '{baseline}', SEs apart = the difference in standard "
            "errors (2 or more seeds each).\n\n")
    final = [line for line in lines if line["step"] == budget.steps]
    best = against_baseline(best_guidance(final), baseline)
    parts = [head]
    if 1.0 in budget.cfg_scales and len(budget.cfg_scales) > 1:
        unguided = against_baseline([line for line in final if line["cfg_scale"] == 1.0], baseline)
        parts += [f"### Step {budget.steps:,}, guidance 1 (none)\n\n", markdown_table(unguided), "\n"]
    title = "each row at its best guidance" if len(budget.cfg_scales) > 1 else f"guidance {scales}"
    parts += [f"### Step {budget.steps:,}, {title}\n\n", markdown_table(best)]
    steps = budget.evaluated_steps
    if len(steps) > 1:
        parts.append(curves_table(best_guidance(lines), steps, "FD / accuracy at each step, best guidance",
                                  show_guidance=True))
        if 1.0 in budget.cfg_scales and len(budget.cfg_scales) > 1:
            parts.append(curves_table([line for line in lines if line["cfg_scale"] == 1.0], steps,
                                      "FD / accuracy at each step, guidance 1", show_guidance=False))
    parts.append(best_lr_table(best))
    parts.append(loss_rank_table(best_guidance(lines)))
    return "".join(parts), best


def loss_rank_table(lines: list[dict]) -> str:
    """Whether the validation loss ranks the rows as FD does: Spearman's rho between the two over the rows (at their
    best guidance) at each evaluated step, where 3 or more rows have both; nothing otherwise."""
    from scipy.stats import spearmanr

    by_step: dict[int, list[dict]] = {}
    for line in lines:
        if line["val_loss"] is not None:
            by_step.setdefault(line["step"], []).append(line)
    rows = [(step, found) for step, found in sorted(by_step.items()) if len(found) >= 3]
    if not rows:
        return ""
    out = ["\n### Validation loss against FD\n", "Spearman's rho between the rows' validation loss and their FD (best "
           "guidance): 1 means the loss ranks the rows exactly as FD does.\n", "| step | rows | rho |", "|---|---|---|"]
    for step, found in rows:
        rho = spearmanr([x["val_loss"] for x in found], [x["fd_mean"] for x in found]).statistic
        out.append(f"| {step:,} | {len(found)} | {rho:+.2f} |")
    return "\n".join(out) + "\n"


def run_grid(out: str | Path, rows: list[Row], budget: Budget, only: set[str] | None = None) -> list[dict]:
    """Train and evaluate every (row, seed), skipping finished work; write the results files after each run.

    Seed-major: the first seed of every row, then the second seed of the rows that have one, and so on, so that a
    grid cut short has the whole sweep before the repeats. A run that diverges (TrainingDiverged) is evaluated at
    the steps it reached, listed in results.md as diverged, and the grid goes on. `only`: the names of the rows to
    train and evaluate; the others contribute only their finished runs. The results cover every finished run of
    the grid's rows in the folder, seeds beyond this invocation's included.
    Returns the final step's lines at each row's best guidance."""
    out = Path(out)
    names = [row.name for row in rows]
    require_distinct_names(names)
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise MPDiTError(f"no grid row is named {', '.join(unknown)}: the rows are {', '.join(names)}")
    samplers = {row.name: row.eval_sampler(budget) for row in rows}  # checked before anything runs
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.json", strict_json({"budget": dataclasses.asdict(budget),
                                                      "rows": [dataclasses.asdict(r) for r in rows]}, "the grid", indent=2))
    seeds = {row.name: row.seeds or budget.seeds for row in rows}
    runs = [(row, seed) for seed in range(max(seeds.values(), default=0)) for row in rows if seed < seeds[row.name]]
    finished = {}
    for row in rows:  # every finished seed in the folder, also beyond this invocation's seeds
        for folder in sorted((out / "runs" / row.name).glob("seed-*")):
            done = finished_run(folder, budget, samplers[row.name]) if folder.name[5:].isdigit() else None
            if done is not None:
                finished[row.name, int(folder.name[5:])] = done

    def report() -> list[dict]:
        return write_results(out, ordered(finished, rows), budget, baseline=names[0]) if finished else []

    best = report()  # what the folder already has, then again after every new run
    for row, seed in runs:
        if (row.name, seed) in finished or (only is not None and row.name not in only):
            continue
        folder = run_dir(out, row, seed)
        diverged_at = None
        try:
            train_run(folder, row, seed, budget)
        except TrainingDiverged as error:
            print(f"[ablate] {row.name} seed {seed}: {error}", flush=True)
            diverged_at = error.step
        finished[row.name, seed] = evaluate_run(folder, row, seed, budget, diverged_at)
        best = report()
    return best


def ordered(finished: dict, rows: list[Row]) -> list[tuple[str, int, dict]]:
    """Finished runs ({(row name, seed): finished_run}) as (row name, seed, run), rows in grid order, seeds
    ascending."""
    return [(row.name, seed, finished[row.name, seed]) for row in rows
            for seed in sorted(s for name, s in finished if name == row.name)]


def diverged_table(runs: list[tuple[str, int, dict]]) -> str:
    """results.md's list of the runs that diverged, or nothing."""
    stopped = [(name, seed, run["diverged"]["step"]) for name, seed, run in runs if "diverged" in run]
    if not stopped:
        return ""
    out = ["\n### Diverged runs\n", "Stopped by the divergence guard (loss or gradient norm not finite for "
           "max_bad_steps steps in a row); evaluated at the steps they reached, so a row's figures at later steps "
           "are over its other seeds (its `seeds` column).\n", "| row | seed | stopped at step |", "|---|---|---|"]
    out += [f"| {name} | {seed} | {step:,} |" for name, seed, step in stopped]
    return "\n".join(out) + "\n"


def write_results(out: Path, runs: list[tuple[str, int, dict]], budget: Budget, baseline: str) -> list[dict]:
    """From finished runs (ordered): OUT/results.csv (one line per run, evaluated step and guidance),
    OUT/results.md and, with several evaluated steps, OUT/curves.png; returns the final step's lines at each row's
    best guidance."""
    records = with_record_defaults([record for _, _, run in runs for record in run["records"]], budget)
    text, best = "", []
    if records:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        atomic_write_text(out / "results.csv", table.getvalue())
        lines = summarize(records)
        text, best = results_markdown(lines, budget, baseline)
        if len(budget.evaluated_steps) > 1:
            from mpdit.evaluation.plots import plot_curves

            plot_curves(best_guidance(lines), out / "curves.png")
        diverged = {name for name, _, run in runs if "diverged" in run}
        points = {step: scored_points(lines, step, diverged) for step in budget.evaluated_steps[::-1]}
        final = points[budget.steps]  # rows named FAMILY-wWIDTH@lr=LR
        if final and not swept(final):  # one lr each: their losses, every step
            text += "".join(loss_per_width_markdown(at, step) for step, at in points.items() if at)
        elif final:  # an lr sweep: the final step's tables, then the earlier steps'
            text += best_lr_markdown(final, budget.steps) + tuned_narrow_markdown(final, budget.steps)
            text += "".join(best_lr_markdown(at, step) for step, at in points.items() if at and step != budget.steps)
            plot_transfer(final, out / "lr-transfer.png", budget.steps)
    atomic_write_text(out / "results.md", text + diverged_table(runs))
    return best
