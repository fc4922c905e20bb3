"""`mpdit gradnoise`: the simple gradient noise scale B = tr(Sigma) / |G|^2 (McCandlish et al. 2018) of a checkpoint's
training loss, in total and per noise-level bin, each ± its jackknife standard error (mpdit.training.gradnoise).

    mpdit gradnoise --ckpt RUN_OR_CHECKPOINT [--batches 32] [--batch-size 64] [--bins 5] [--seed 0] [--json]
    mpdit gradnoise --ckpt RUN_OR_CHECKPOINT --bf16-error [--batches 32] [--batch-size 64]

The loss is the run's own (its objective, Min-SNR weighting and label dropout), on its training data, with the
raw weights by default (the weights the optimizer steps); K = --batches independent batches of --batch-size
images each, seeded. Writes CHECKPOINT/gradnoise.json unless --out names another file.
--bf16-error: instead, the gradient under bf16 autocast against fp32's on the same batches, its squared error
against the batch gradient's own variance tr(Sigma) / b, and each block's output error (CHECKPOINT/bf16-error.json).
"""

from pathlib import Path

from mpdit.data.datasets import load_dataset
from mpdit.diffusion.generate import device_of
from mpdit.files import atomic_write_text, strict_json
from mpdit.training.checkpoint import (checkpoint_objective, checkpoint_step, load_checkpoint_model, run_data_spec,
                                       run_train_config)
from mpdit.training.gradnoise import bf16_gradient_error, gradient_noise_scale
from mpdit.training.outputs import refuse_needed_file


def describe(scale: dict) -> str:
    se = "" if scale["b_simple_se"] is None else f" ± {scale['b_simple_se']:.2g}"
    b = ("not measurable (|G|^2 <= 0 at this many batches)" if scale["b_simple"] is None
         else f"{scale['b_simple']:.4g}{se}")
    return f"B_simple {b} (tr Sigma {scale['trace_sigma']:.4g}, |G|^2 {scale['grad_norm_sq']:.4g})"


def noise_scale_lines(result: dict, source: str) -> list[str]:
    lines = [f"gradient noise scale of {source}: {describe(result['total'])}"]
    return lines + [f"  time {b['range'][0]:g}-{b['range'][1]:g}: {describe(b)}" for b in result["bins"]]


def bf16_error_lines(result: dict, source: str) -> list[str]:
    scales = result["output_scale_errors"]
    return [f"bf16 autocast against fp32 on {source}: gradient error {result['gradient_error']:.3g} of its norm; its "
            f"square is {result['error_over_noise']:.3g} of the batch gradient's own variance tr(Sigma)/b",
            "  output error (scale error): " + ", ".join(f"{name} {error:.3g} ({scales[name]:+.2g})"
                                                        for name, error in result["output_errors"].items()),
            "  largest squared gradient error against the batch noise, per parameter tensor: "
            + ", ".join(f"{name} {ratio:.3g}" for name, ratio in result["worst_parameters"].items())]


def run(args) -> int:
    if args.out:
        refuse_needed_file(args.out, "--out")
    device = device_of(args.device)
    model, checkpoint, weights = load_checkpoint_model(args.ckpt, args.weights, device)
    objective = checkpoint_objective(checkpoint, model)
    data = load_dataset(run_data_spec(checkpoint), "train", model.config.input_size)
    min_snr_gamma = run_train_config(checkpoint).get("min_snr_gamma", 0.0)
    options = dict(batches=args.batches, batch_size=args.batch_size, seed=args.seed, min_snr_gamma=min_snr_gamma,
                   device=device)
    if args.bf16_error:
        result = bf16_gradient_error(model, objective, data, **options)
        file, what, lines = "bf16-error.json", "the bf16 gradient error", bf16_error_lines
    else:
        result = gradient_noise_scale(model, objective, data, bins=args.bins, **options)
        file, what, lines = "gradnoise.json", "the gradient noise scale", noise_scale_lines
    result = {"checkpoint": str(checkpoint), "step": checkpoint_step(checkpoint), "weights": weights,
              "objective": objective.name, "min_snr_gamma": min_snr_gamma, **result}
    out = Path(args.out) if args.out else checkpoint / file
    atomic_write_text(out, strict_json(result, what, indent=2))
    if args.json:
        print(strict_json(result | {"written_to": str(out)}, what))
        return 0
    source = f"{checkpoint} ({weights} weights, {objective.name}; {args.batches} batches of {args.batch_size})"
    print("\n".join(lines(result, source)))
    print(f"written to {out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("gradnoise", help="gradient noise scale of a checkpoint's training loss",
                                   description=__doc__)
    parser.add_argument("--ckpt", required=True, help="run folder, its checkpoints/ folder, or one step folder")
    parser.add_argument("--weights", default="raw", help="raw (default), ema, or sigma-S.SSS")
    parser.add_argument("--batches", type=int, default=32, help="K independent batches (default 32)")
    parser.add_argument("--batch-size", type=int, default=64, help="b images per batch (default 64)")
    parser.add_argument("--bins", type=int, default=5, help="noise-level bins (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default=None,
                        help="JSON result path (default CHECKPOINT/gradnoise.json, or bf16-error.json)")
    parser.add_argument("--bf16-error", action="store_true",
                        help="measure bf16 autocast's gradient error against fp32 instead (bf16-error.json)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)
