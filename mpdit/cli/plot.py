"""`mpdit plot RUN_DIR...`: loss, metric at checkpoints, and per-block activation and weight magnitudes
of one or more training runs, as PNG files."""

from mpdit.evaluation.plots import plot_runs


def run(args) -> int:
    labels = args.labels.split(",") if args.labels else None
    for path in plot_runs(args.runs, args.out, labels):
        print(path)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("plot", help="plot training runs", description=__doc__)
    parser.add_argument("runs", nargs="+", help="training run folders")
    parser.add_argument("--out", default="plots", help="folder for the PNG files (default plots)")
    parser.add_argument("--labels", default=None, help="comma list of legend labels, one per run")
    parser.set_defaults(func=run)
