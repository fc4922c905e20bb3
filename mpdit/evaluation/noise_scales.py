"""The gradient noise comparison of issue 24 (docs/results.md, section 4): `mpdit gradnoise` results laid out as
DIR/<objective>/<row>/seed-<s>/step-<n>.json (scripts/gradnoise_grid.sh writes them), summarized over seeds as
DIR/results.md (B_simple per objective, row and step, in total and per noise-level bin) and DIR/noise-scale.png.
"""

import math
import re
import statistics
from pathlib import Path

from mpdit.errors import MPDiTError
from mpdit.evaluation.plots import save_figure
from mpdit.files import atomic_write_text, read_json

LAYOUT = re.compile(r"^(?P<objective>[^/]+)/(?P<row>[^/]+)/seed-(?P<seed>\d+)/step-(?P<step>\d+)\.json$")


def read_noise_scales(folder: str | Path) -> list[dict]:
    """Every result under ``folder`` in the layout above: {"objective", "row", "seed", "step", "total", "bins",
    "total_se", "bins_se", "ranges", "protocol"}, with total and bins the B_simple values (None where not measurable),
    the _se their jackknife standard errors (None where not measured) and protocol (batches, batch size, weights),
    ordered by the path's fields."""
    folder = Path(folder)
    results = []
    for path in sorted(folder.rglob("*.json")):
        match = LAYOUT.match(path.relative_to(folder).as_posix())
        if match is None:
            continue
        saved = read_json(path, "a gradient noise result")
        if saved.get("objective") != match["objective"]:
            raise MPDiTError(f"{path} holds a {saved.get('objective')} measurement but lies under "
                             f"{match['objective']}/: move it to its objective's folder")
        results.append({"objective": match["objective"], "row": match["row"], "seed": int(match["seed"]),
                        "step": int(match["step"]), "total": saved["total"]["b_simple"],
                        "bins": [b["b_simple"] for b in saved["bins"]], "total_se": saved["total"].get("b_simple_se"),
                        "bins_se": [b.get("b_simple_se") for b in saved["bins"]],
                        "ranges": [b["range"] for b in saved["bins"]],
                        "protocol": (saved["batches"], saved["batch_size"], saved["weights"])})
    return sorted(results, key=lambda r: (r["objective"], r["row"], r["step"], r["seed"]))


def spread(values: list[float | None], errors: list[float | None]) -> dict:
    """{"mean", "sd", "n", "missing", "se"} over the measurable values (None: not measurable at that many batches);
    se: the root mean square of their standard errors (the part of the spread over seeds that is measurement noise),
    None where one is missing."""
    kept = [(v, e) for v, e in zip(values, errors) if v is not None]
    ses = [e for _, e in kept]
    return {"mean": statistics.fmean(v for v, _ in kept) if kept else math.nan,
            "sd": statistics.stdev(v for v, _ in kept) if len(kept) > 1 else 0.0, "n": len(kept),
            "missing": len(values) - len(kept),
            "se": math.sqrt(statistics.fmean(e * e for e in ses)) if kept and None not in ses else None}


def summarize_noise_scales(results: list[dict]) -> list[dict]:
    """One line per (objective, row, step): the spread over seeds of B_simple in total and in each bin."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["objective"], r["row"], r["step"]), []).append(r)
    return [{"objective": objective, "row": row, "step": step, "seeds": len(runs), "ranges": runs[0]["ranges"],
             "total": spread([r["total"] for r in runs], [r["total_se"] for r in runs]),
             "bins": [spread([r["bins"][j] for r in runs], [r["bins_se"][j] for r in runs])
                      for j in range(len(runs[0]["bins"]))]}
            for (objective, row, step), runs in groups.items()]


def cell(s: dict) -> str:
    if s["n"] == 0:
        return "not measurable"
    text = f"{s['mean']:.3g}" + (f" ± {s['sd']:.2g}" if s["n"] > 1 else "")
    notes = (([] if s["se"] is None else [f"se {s['se']:.2g}"])
             + ([f"{s['missing']} not measurable"] if s["missing"] else []))
    return text + (f" ({'; '.join(notes)})" if notes else "")


def noise_markdown(lines: list[dict]) -> str:
    """The table: B_simple mean ± sd over seeds (se: the measurements' jackknife standard error, root mean square
    over the seeds), in total and per noise-level bin (low noise first)."""
    out = []
    for objective in sorted({line["objective"] for line in lines}):
        rows = [line for line in lines if line["objective"] == objective]
        ranges = rows[0]["ranges"]
        out += [f"\n### {objective}: B_simple = tr(Sigma) / |G|^2 (mean ± sd over seeds; se: one measurement's "
                "jackknife standard error)\n",
                "| row | step | seeds | total | " + " | ".join(f"time {lo:g}-{hi:g}" for lo, hi in ranges) + " |",
                "|---|---|---|---|" + "---|" * len(ranges)]
        out += [f"| {line['row']} | {line['step']:,} | {line['seeds']} | {cell(line['total'])} | "
                + " | ".join(cell(b) for b in line["bins"]) + " |" for line in rows]
    return "\n".join(out) + "\n"


def error_bar(s: dict) -> float:
    """One sd over seeds; with one seed its jackknife standard error (0 where there is none)."""
    return s["sd"] if s["n"] > 1 else s["se"] or 0.0


def plot_noise_scales(lines: list[dict], path: str | Path) -> Path:
    """A column per objective: B_simple in total against the step (top) and per noise-level bin at the last step
    (bottom), one line per row, error bars one sd over seeds (one seed: its jackknife standard error); log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = sorted({line["objective"] for line in lines})
    fig, axes = plt.subplots(2, len(objectives), figsize=(5 * len(objectives), 7), squeeze=False)
    for k, objective in enumerate(objectives):
        rows = sorted({line["row"] for line in lines if line["objective"] == objective})
        for row in rows:
            mine = sorted((line for line in lines if line["objective"] == objective and line["row"] == row),
                          key=lambda line: line["step"])
            axes[0][k].errorbar([line["step"] for line in mine], [line["total"]["mean"] for line in mine],
                                yerr=[error_bar(line["total"]) for line in mine], marker="o", capsize=3, label=row)
            last = mine[-1]
            middles = [(lo + hi) / 2 for lo, hi in last["ranges"]]
            axes[1][k].errorbar(middles, [b["mean"] for b in last["bins"]], yerr=[error_bar(b) for b in last["bins"]],
                                marker="o", capsize=3, label=f"{row}, step {last['step']:,}")
        axes[0][k].set(yscale="log", xlabel="training step", ylabel="B_simple (all noise levels)", title=objective)
        axes[1][k].set(yscale="log", xlabel="time (noise level, bin middle)", ylabel="B_simple in the bin")
        for ax in axes[:, k]:
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_noise_report(folder: str | Path) -> Path:
    """DIR/results.md and DIR/noise-scale.png from every result under DIR; returns the markdown's path."""
    folder = Path(folder)
    results = read_noise_scales(folder)
    if not results:
        raise MPDiTError(f"{folder} holds no gradient noise results laid out as OBJECTIVE/ROW/seed-S/step-N.json")
    protocols = sorted({r["protocol"] for r in results})
    if len(protocols) > 1:
        raise MPDiTError(f"{folder} mixes measurements of different protocols (batches, batch size, weights): "
                         f"{protocols}; measure every checkpoint alike")
    batches, batch_size, weights = protocols[0]
    lines = summarize_noise_scales(results)
    text = ("Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018) of each run's training loss, "
            f"`mpdit gradnoise`: {batches} batches of {batch_size}, {weights} weights; made by "
            "scripts/gradnoise_grid.sh.\n" + noise_markdown(lines))
    atomic_write_text(folder / "results.md", text)
    plot_noise_scales(lines, folder / "noise-scale.png")
    return folder / "results.md"
