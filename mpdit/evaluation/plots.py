"""Plots of training runs (matplotlib, PNG): loss, metric at checkpoints, and per-block magnitudes."""

import math
from pathlib import Path

from mpdit.errors import MPDiTError
from mpdit.files import read_json, read_json_lines
from mpdit.training.checkpoint import checkpoint_step


def read_run(run_dir: str | Path) -> dict:
    """A run's log entries and its evaluations, one per step: run-level eval.json and checkpoints/step-*/eval*.json
    (`mpdit ablate` writes eval-cfgG.json per guidance scale); of several at one step, the one with the lowest FD."""
    run_dir = Path(run_dir)
    log_path = run_dir / "log.jsonl"
    if not log_path.is_file():
        raise MPDiTError(f"{run_dir} has no log.jsonl: pass training run folders")
    log = read_json_lines(log_path, "training log")
    evals = []
    final_step = log[-1]["step"] if log else 0
    for path in [run_dir / "eval.json", *sorted(run_dir.glob("checkpoints/step-*/eval*.json"))]:
        if path.is_file():
            result = read_json(path, "evaluation")
            evals.append({"step": evaluated_step(result, default=final_step), **result["metrics"]})
    best: dict[int, dict] = {}
    for e in evals:
        if e["step"] not in best or e.get("fd_classifier", math.inf) < best[e["step"]].get("fd_classifier", math.inf):
            best[e["step"]] = e
    evals = sorted(best.values(), key=lambda e: e["step"])
    return {"log": log, "evals": evals}


def evaluated_step(result: dict, default: int) -> int:
    """The training step of the checkpoint an eval.json result scored (from its protocol), else ``default``."""
    step = checkpoint_step(str(result.get("protocol", {}).get("checkpoint", "")))
    return default if step is None else step


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average for readable loss curves (bias-corrected)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def save_figure(fig, path: str | Path) -> Path:
    """Lay a figure out, write it as a PNG (120 dpi) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> list[Path]:
    """Write loss.png, metric.png (when evaluations exist) and magnitudes.png into out_dir; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    labels = labels or [str(Path(d)) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (run, label) in enumerate(zip(runs, labels)):
        steps = [e["step"] for e in run["log"]]
        ax.plot(steps, smooth([e["loss"] for e in run["log"]]), color=colors[i % len(colors)], label=label)
    ax.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log", title="Loss")
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out_dir / "loss.png"))

    if any(run["evals"] for run in runs):
        fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for i, (run, label) in enumerate(zip(runs, labels)):
            steps = [e["step"] for e in run["evals"]]
            ax_fd.plot(steps, [e["fd_classifier"] for e in run["evals"]], "o-", color=colors[i % len(colors)],
                       label=label)
            ax_acc.plot(steps, [100 * e["accuracy"] for e in run["evals"]], "o-", color=colors[i % len(colors)],
                        label=label)
        ax_fd.set(xlabel="step", ylabel="FD (classifier features)", title="Fréchet distance (lower is better)")
        ax_acc.set(xlabel="step", ylabel="class accuracy of samples (%)", title="Class accuracy")
        ax_fd.legend(fontsize=7)
        written.append(save_figure(fig, out_dir / "metric.png"))

    fig, (ax_act, ax_w) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (run, label) in enumerate(zip(runs, labels)):
        entries = [e for e in run["log"] if "telemetry" in e]
        if not entries:
            continue
        steps = [e["step"] for e in entries]
        depth = len(entries[0]["telemetry"]["act_rms"])
        for block in range(depth):
            alpha = 0.35 + 0.65 * block / max(depth - 1, 1)
            kwargs = dict(color=colors[i % len(colors)], alpha=alpha, label=label if block == depth - 1 else None)
            ax_act.plot(steps, [e["telemetry"]["act_rms"][block] for e in entries], **kwargs)
            ax_w.plot(steps, [e["telemetry"]["weight_rms"][block] for e in entries], **kwargs)
    ax_act.set(xlabel="step", ylabel="RMS of the residual stream", yscale="log",
               title="Activation magnitude per block (darker = deeper)")
    ax_w.set(xlabel="step", ylabel="RMS of the block's weight matrices", yscale="log",
             title="Weight magnitude per block")
    ax_act.legend(fontsize=7)
    written.append(save_figure(fig, out_dir / "magnitudes.png"))
    return written


def plot_curves(lines: list[dict], path: str | Path) -> Path:
    """FD and class accuracy against training step, one line per grid row, error bars the sd over seeds; DiT rows
    (mp none) dashed, a color per row (up to 20 distinct), the legend beside the plots.

    ``lines``: summary lines of `mpdit ablate` (mpdit.evaluation.ablation.summarize), one per (row, step), e.g.
    each at its best guidance. Writes and returns ``path`` (PNG).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_row: dict[str, list[dict]] = {}
    for line in sorted(lines, key=lambda line: line["step"]):
        by_row.setdefault(line["row"], []).append(line)
    colors = plt.get_cmap("tab10" if len(by_row) <= 10 else "tab20").colors
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (name, points) in enumerate(by_row.items()):
        steps = [p["step"] for p in points]
        style = dict(marker="o", capsize=3, label=name, color=colors[i % len(colors)],
                     linestyle="--" if points[0].get("mp") == "none" else "-")
        ax_fd.errorbar(steps, [p["fd_mean"] for p in points], [p["fd_std"] for p in points], **style)
        ax_acc.errorbar(steps, [100 * p["acc_mean"] for p in points], [100 * p["acc_std"] for p in points], **style)
    ax_fd.set(xlabel="step", ylabel="FD (classifier features)", yscale="log",
              title="Fréchet distance (lower is better)")
    ax_acc.set(xlabel="step", ylabel="class accuracy of samples (%)", title="Class accuracy")
    ax_acc.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return save_figure(fig, path)
