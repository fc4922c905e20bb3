"""Learning-rate transfer across widths: for a grid whose rows are named FAMILY-wWIDTH@lr=LR (docs/grids/width-lr.json),
each family's validation loss against the learning rate with one curve per width (the muP figure), the best lr per
width, how far it moves per doubling of the width, and what the lr tuned at the smallest width costs at the wider ones.

A run that diverged before the scored step counts as a loss of infinity at its lr: it brackets the optimum from
above. A best lr at the edge of its width's lr grid is marked: it only bounds the optimum. Where both neighbours
of the best lr trained (a loss under FIT_NEIGHBOURS_WITHIN times the best: a run that collapsed or diverged is not
on the parabola), the optimum is also interpolated (the vertex of the parabola through the three points in
(log10 lr, loss)), so that a shift smaller than the grid's half-decade step still shows in the fitted slope.
"""

import math
import re
import statistics
from pathlib import Path

from mpdit.evaluation.plots import save_figure

FIT_NEIGHBOURS_WITHIN = 2.0
NAME = re.compile(r"^(?P<family>.+)-w(?P<width>\d+)@lr=(?P<lr>[0-9.e+-]+)$")  # the width: the line's own


def scored_points(lines: list[dict], step: int, diverged: set[str] = frozenset()) -> dict[tuple[str, int, float], dict]:
    """{(family, width, lr): {"val_loss", "fd"}} at ``step``: the validation loss (mean over seeds; it does not depend
    on the guidance) and the best guidance's mean FD, at the width the row trained at (not the name's). Rows in
    ``diverged`` without a line at ``step`` (every seed stopped before it) score a loss and FD of infinity; rows
    named otherwise, or without a loss, are left out."""
    points: dict[tuple[str, int, float], dict] = {}
    widths: dict[str, int] = {}
    for line in lines:
        match = NAME.match(line["row"])
        if not match:
            continue
        widths[line["row"]] = int(line["width"])
        if line["step"] == step and line["val_loss"] is not None:
            key = (match["family"], int(line["width"]), float(line["lr"]))
            fd = min(line["fd_mean"], points[key]["fd"]) if key in points else line["fd_mean"]
            points[key] = {"val_loss": line["val_loss"], "fd": fd}
    for name in diverged:
        match = NAME.match(name)
        if match:
            key = (match["family"], widths.get(name, int(match["width"])), float(match["lr"]))
            points.setdefault(key, {"val_loss": math.inf, "fd": math.inf})
    return points


def loss_curves(points: dict[tuple[str, int, float], dict]) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """{family: {width: [(lr, validation loss)], lrs ascending}}, families and widths ascending, from scored_points."""
    curves: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for family, width, lr in sorted(points):
        curves.setdefault(family, {}).setdefault(width, []).append((lr, points[family, width, lr]["val_loss"]))
    return curves


def parabola_vertex(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float]) -> float:
    """The x of the vertex of the parabola through three points with x0 < x1 < x2 and y1 below y0 and y2."""
    (x0, y0), (x1, y1), (x2, y2) = p0, p1, p2
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1))  # y = a x^2 + b x + c, both times (x0-x1)(x0-x2)(x1-x2)
    b = (x2 ** 2 * (y0 - y1) + x1 ** 2 * (y2 - y0) + x0 ** 2 * (y1 - y2))
    return -b / (2 * a)


def best_lrs(curves: dict) -> dict[str, dict[int, dict]]:
    """{family: {width: {"lr", "val_loss", "edge", "fitted"}}}: the lr of the lowest finite loss at each width; edge:
    it is the smallest or largest lr run at that width (or under 3 lrs were run), so the optimum may lie beyond it;
    fitted: the interpolated optimum lr where both neighbours have a loss under FIT_NEIGHBOURS_WITHIN times the
    best, else None. Widths with no finite loss are left out."""
    best = {}
    for family, widths in curves.items():
        for width, points in widths.items():
            finite = [k for k in range(len(points)) if math.isfinite(points[k][1])]
            if not finite:
                continue
            i = min(finite, key=lambda k: points[k][1])
            edge = len(points) < 3 or i in (0, len(points) - 1)
            fitted = None
            if not edge and max(points[i - 1][1], points[i + 1][1]) < FIT_NEIGHBOURS_WITHIN * points[i][1]:
                logs = [(math.log10(lr), loss) for lr, loss in points[i - 1:i + 2]]
                fitted = 10 ** parabola_vertex(*logs)
            best.setdefault(family, {})[width] = {"lr": points[i][0], "val_loss": points[i][1], "edge": edge,
                                                  "fitted": fitted}
    return best


def shift_per_doubling(lrs: dict[int, float]) -> float | None:
    """The least-squares slope of 2 log10(lr) on log2(width) over {width: lr}: half-decades the best lr moves per
    width doubling (None with fewer than two widths)."""
    if len(lrs) < 2:
        return None
    x = [math.log2(width) for width in lrs]
    y = [2 * math.log10(lr) for lr in lrs.values()]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


def best_lr_markdown(points: dict[tuple[str, int, float], dict], step: int) -> str:
    """results.md's table of each family's best lr and loss per width at ``step`` and its shift per width doubling."""
    best = best_lrs(loss_curves(points))
    widths = sorted({w for f in best.values() for w in f})
    out = [f"\n### Learning-rate transfer across widths (validation loss at step {step:,})\n",
           "Best lr per width (* at the edge of the lrs run there: the optimum may lie beyond; a diverged run counts "
           "as an infinite loss), its validation loss, the optimum interpolated between its neighbours (the vertex "
           f"of a parabola in log lr; where both neighbours' losses are under {FIT_NEIGHBOURS_WITHIN:g}x the best), and "
           "the shift of the best lr per width doubling (least-squares slope, half-decades; fitted: over the "
           "interpolated optima, the grid's best where there is none).\n",
           "| family | " + " | ".join(f"width {w}" for w in widths) + " | shift per doubling | fitted |",
           "|---|" + "---|" * (len(widths) + 2)]
    for family, at in best.items():
        cells = [f"{at[w]['lr']:g}{'*' if at[w]['edge'] else ''} ({at[w]['val_loss']:.4f}"
                 + (f"; fit {at[w]['fitted']:.2g})" if at[w]["fitted"] else ")") if w in at else "" for w in widths]
        grid = shift_per_doubling({w: b["lr"] for w, b in at.items()})
        fitted = shift_per_doubling({w: b["fitted"] or b["lr"] for w, b in at.items()})
        out.append(f"| {family} | " + " | ".join(cells) + f" | {signed(grid)} | {signed(fitted)} |")
    return "\n".join(out) + "\n"


def tuned_narrow_markdown(points: dict[tuple[str, int, float], dict], step: int) -> str:
    """results.md's practical test: each family's best lr at its smallest width, used at the wider ones, against
    their own best lr (validation loss and FD at ``step``); nothing where no family has two widths."""
    best = best_lrs(loss_curves(points))
    wider = []
    for family, at in best.items():
        base = min(at)
        lr = at[base]["lr"]
        for width in sorted(w for w in at if w > base):
            own = points[family, width, at[width]["lr"]]
            used = points.get((family, width, lr))
            if used is None or not math.isfinite(used["val_loss"]):
                cells = ["not run" if used is None else "diverged", "", "", ""]
            else:
                cells = [f"{used['val_loss']:.4f} ({own['val_loss']:.4f})", percent(used["val_loss"], own["val_loss"]),
                         f"{used['fd']:.3g} ({own['fd']:.3g})", percent(used["fd"], own["fd"])]
            wider.append(f"| {family} | {base} | {lr:g} | {width} | " + " | ".join(cells) + " |")
    if not wider:
        return ""
    return "\n".join([f"\n#### The lr tuned at the smallest width, used wider (step {step:,})\n",
                      "Each family's best lr at its smallest width, trained at each wider width: validation loss and "
                      "FD there, and how far they are from that width's own best lr (the lowest loss; FD at that "
                      "lr).\n",
                      "| family | tuned at | lr | width | loss (own best) | loss change | FD (own best) | FD change |",
                      "|---|---|---|---|---|---|---|---|", *wider]) + "\n"


def swept(points: dict[tuple[str, int, float], dict]) -> bool:
    """Whether some family ran more than one lr at some width: a sweep that a best lr can be read from."""
    return any(len(lrs) > 1 for widths in loss_curves(points).values() for lrs in widths.values())


def loss_per_width_markdown(points: dict[tuple[str, int, float], dict], step: int) -> str:
    """results.md's table for a grid of one lr per family and width (chosen elsewhere, such as each family's best
    on a sweep): its validation loss and FD per width, with no best lr or shift, since nothing was swept here."""
    curves = loss_curves(points)
    widths = sorted({w for family in curves.values() for w in family})
    out = [f"\n### Validation loss per width (step {step:,})\n",
           "One lr per family and width (no sweep here, so no best lr or shift is read from this grid): validation "
           "loss (FD at the best guidance) and the lr.\n",
           "| family | " + " | ".join(f"width {w}" for w in widths) + " |", "|---|" + "---|" * len(widths)]
    for family, at in curves.items():
        cells = []
        for width in widths:
            (lr, loss), = at.get(width, [(None, None)])
            cells.append("" if lr is None else f"{loss:.4f} ({points[family, width, lr]['fd']:.3g}) at {lr:g}")
        out.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def percent(value: float, base: float) -> str:
    return f"{100 * (value - base) / base:+.1f}%"


def plot_transfer(points: dict[tuple[str, int, float], dict], path: str | Path, step: int) -> Path:
    """One panel per family: validation loss against lr (log), one line per width; the best point of each circled,
    diverged lrs crossed at the top of the panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(points)
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.8), squeeze=False)
    for ax, (family, widths) in zip(axes[0], curves.items()):
        top = max((loss for pts in widths.values() for _, loss in pts if math.isfinite(loss)), default=1.0)
        for width, pts in widths.items():
            finite = [(lr, loss) for lr, loss in pts if math.isfinite(loss)]
            (line,) = ax.plot(*zip(*finite), marker="o", label=f"width {width}") if finite else ax.plot([], [])
            if finite:
                lr, loss = min(finite, key=lambda p: p[1])
                ax.plot([lr], [loss], marker="o", markersize=12, fillstyle="none", color=line.get_color())
            crossed = [lr for lr, loss in pts if not math.isfinite(loss)]
            if crossed:
                ax.plot(crossed, [top * 1.05] * len(crossed), marker="x", markersize=9, linestyle="none",
                        color=line.get_color(), label=f"width {width}: diverged")
        ax.set(xscale="log", xlabel="learning rate", ylabel=f"validation loss at step {step:,}", title=family)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
