"""``mpdit classifier``: train the small CNN used by the offline metric (see docs/evaluation.md).

    mpdit classifier --data mnist --out OUT --seed 0 [--epochs 2]

writes OUT/classifier.safetensors and OUT/classifier.json (architecture, recipe, test accuracy).
"""

from __future__ import annotations

from mpdit.cli.numbers import finite_float
from mpdit.errors import MPDiTError
from mpdit.files import strict_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "classifier",
        help="train the small CNN classifier of the offline metric",
        description="Train the small CNN classifier used by the offline metric (FD in its features, class "
        "accuracy), deterministically for a seed on the CPU; writes OUT/classifier.safetensors and "
        "OUT/classifier.json.",
    )
    parser.add_argument("--data", default="mnist", help="dataset spec: mnist, idx:PATH or folder:PATH (default mnist)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialization and shuffling (default 0)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the train split (default 2)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (for quick tests)")
    parser.add_argument("--lr", type=finite_float, default=2e-3, help="AdamW learning rate, cosine-decayed (default 2e-3)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=run)


def run(args) -> int:
    from mpdit.evaluation.classifier import save_classifier, train_classifier

    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or (args.max_steps is not None and args.max_steps < 1):
        raise MPDiTError("--epochs, --batch-size, --lr and --max-steps must be positive")
    model, recipe = train_classifier(
        data=args.data,
        seed=args.seed,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        progress=not args.quiet,
    )
    recipe["command"] = (
        f"mpdit classifier --data {args.data} --out OUT --seed {args.seed} --epochs {args.epochs}"
        f" --lr {args.lr:g} --batch-size {args.batch_size}"
        + (f" --max-steps {args.max_steps}" if args.max_steps is not None else "")
    )
    weights_path, json_path = save_classifier(model, args.out, recipe)
    print(f"wrote {weights_path} and {json_path}")
    print(strict_json({"test_accuracy": recipe["test_accuracy"], "train_seconds": recipe["train_seconds"]}, "the report"))
    return 0
