"""Learning-rate transfer across widths: for a grid whose rows are named FAMILY-wWIDTH@lr=LR (docs/grids/width-lr.json),
each family's validation loss against the learning rate with one curve per width (the muP figure), the best lr per
width, and how far it moves per doubling of the width (a least-squares slope of log10(best lr) on log2(width), in
half-decades). A best lr at the edge of its width's lr grid is marked: it only bounds the optimum.
"""

import math
import re
import statistics
from pathlib import Path

NAME = re.compile(r"^(?P<family>.+)-w(?P<width>\d+)@lr=(?P<lr>[0-9.e+-]+)$")  # the width: the line's own


def loss_curves(lines: list[dict], step: int) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """{family: {width: [(lr, mean validation loss over seeds)], lrs ascending}} from summary lines at ``step``
    (any guidance: the validation loss does not depend on it), the width the row trained at (not the name's);
    rows named otherwise, or without a loss, are left out."""
    curves: dict[str, dict[int, dict[float, float]]] = {}
    for line in lines:
        match = NAME.match(line["row"])
        if match and line["step"] == step and line["val_loss"] is not None:
            family, width = match["family"], int(line["width"])
            curves.setdefault(family, {}).setdefault(width, {})[float(line["lr"])] = line["val_loss"]
    return {family: {width: sorted(points.items()) for width, points in sorted(widths.items())}
            for family, widths in curves.items()}


def best_lrs(curves: dict) -> dict[str, dict[int, dict]]:
    """{family: {width: {"lr", "val_loss", "edge"}}}: the lr of the lowest loss at each width; edge: it is the
    smallest or largest lr run at that width (with 3 or more lrs run), so the optimum may lie beyond it."""
    best = {}
    for family, widths in curves.items():
        for width, points in widths.items():
            i = min(range(len(points)), key=lambda k: points[k][1])
            best.setdefault(family, {})[width] = {"lr": points[i][0], "val_loss": points[i][1],
                                                  "edge": len(points) < 3 or i in (0, len(points) - 1)}
    return best


def shift_per_doubling(best: dict[int, dict]) -> float | None:
    """The least-squares slope of 2 log10(best lr) on log2(width): half-decades the best lr moves per width doubling
    (None with fewer than two widths)."""
    if len(best) < 2:
        return None
    x = [math.log2(width) for width in best]
    y = [2 * math.log10(b["lr"]) for b in best.values()]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def transfer_markdown(curves: dict, step: int) -> str:
    """results.md's section: each family's best lr and loss per width and its shift per width doubling."""
    best = best_lrs(curves)
    out = [f"\n### Learning-rate transfer across widths (validation loss at step {step:,})\n",
           "Best lr per width (* at the edge of the lrs run there: the optimum may lie beyond), its validation "
           "loss, and the shift of the best lr per width doubling (least-squares slope, half-decades).\n",
           "| family | " + " | ".join(f"width {w}" for w in sorted({w for f in best.values() for w in f}))
           + " | shift per doubling |"]
    widths = sorted({w for f in best.values() for w in f})
    out.append("|---|" + "---|" * (len(widths) + 1))
    for family, at in best.items():
        cells = [f"{at[w]['lr']:g}{'*' if at[w]['edge'] else ''} ({at[w]['val_loss']:.4f})" if w in at else ""
                 for w in widths]
        slope = shift_per_doubling(at)
        out.append(f"| {family} | " + " | ".join(cells) + f" | {'' if slope is None else f'{slope:+.2f}'} |")
    return "\n".join(out) + "\n"


def plot_transfer(curves: dict, path: str | Path, step: int) -> Path:
    """One panel per family: validation loss against lr (log), one line per width; the best point of each circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.8), squeeze=False)
    for ax, (family, widths) in zip(axes[0], curves.items()):
        for width, points in widths.items():
            lrs, losses = zip(*points)
            (line,) = ax.plot(lrs, losses, marker="o", label=f"width {width}")
            i = losses.index(min(losses))
            ax.plot([lrs[i]], [losses[i]], marker="o", markersize=12, fillstyle="none", color=line.get_color())
        ax.set(xscale="log", xlabel="learning rate", ylabel=f"validation loss at step {step:,}", title=family)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
