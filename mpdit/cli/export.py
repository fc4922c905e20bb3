"""``mpdit export``: a training run or checkpoint as a shareable ``save_pretrained`` folder.

    mpdit export --ckpt RUN_OR_CHECKPOINT --out OUT_DIR [--weights auto|raw|ema|sigma-S.SSS]

writes OUT_DIR/config.json, model.safetensors, mpdit.json (training config, metrics found beside the
checkpoint, latent space, objective) and a README.md model card (``mpdit.training.export.export_checkpoint``); load it with
``MPDiT.from_pretrained(OUT_DIR)`` or ``MPDiTPipeline.from_pretrained_model(OUT_DIR)``.
"""

from mpdit.errors import MPDiTError
from mpdit.files import strict_json
from mpdit.training.export import export_checkpoint
from mpdit.training.checkpoint import is_training_folder


def run(args) -> int:
    if is_training_folder(args.out):
        raise MPDiTError(f"--out {args.out} is a training checkpoint or run: exporting there would replace its raw "
                         "weights (and a --resume would continue from them); choose a new folder")
    out = export_checkpoint(args.ckpt, args.out, args.weights)
    print(strict_json({"exported": str(out), "checkpoint": str(args.ckpt), "weights": args.weights},
                      "the report"))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="a run or checkpoint as a save_pretrained folder (model card)",
                                   description=__doc__)
    parser.add_argument("--ckpt", required=True, help="run folder, its checkpoints/ folder, or one step folder")
    parser.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, card)")
    parser.add_argument("--weights", default="auto",
                        help="raw, ema, or sigma-S.SSS (power EMA); auto: the largest sigma_rel, else raw")
    parser.set_defaults(func=run)
