"""`mpdit sample`: class-conditional samples from a checkpoint, written as a PNG grid and an ADM-style .npz."""

import argparse
from pathlib import Path

import torch

from mpdit.cli.numbers import finite_float
from mpdit.data.latents import DEFAULT_VAE, LatentDecoder
from mpdit.diffusion.generate import DEFAULT_CFG_SCALE, device_of, generate, save_grid, save_npz
from mpdit.diffusion.objectives import OBJECTIVES, make_objective
from mpdit.errors import MPDiTError
from mpdit.files import strict_json
from mpdit.model.convert import load_official_checkpoint
from mpdit.training.checkpoint import checkpoint_objective, load_checkpoint_model, run_data_spec


def load_sampling_model(args, device: str):
    """(model, objective, decode or None, source dict) from --dit-checkpoint (official DiT + VAE, latents * 0.18215;
    DDPM) or --ckpt (its recorded objective; the VAE decoder of its latents:PATH data, if any; --vae overrides the
    VAE). The sampler asked for, if any, is checked against the objective here, before any sampling."""
    if args.dit_checkpoint and args.ckpt:
        raise MPDiTError("give --ckpt (a run or checkpoint folder) or --dit-checkpoint (an official DiT .pt), not both")
    if args.dit_checkpoint:
        model = load_official_checkpoint(args.dit_checkpoint, device, args.dit_num_classes)
        require_guidance_fits(model, args.cfg_scale, args.dit_checkpoint)
        decode = LatentDecoder.official(args.vae or DEFAULT_VAE, device)
        objective = make_objective(None, model.config)
        source = {"checkpoint": str(args.dit_checkpoint), "weights": "official DiT", "vae": decode.name}
    else:
        if not args.ckpt:
            raise MPDiTError("give --ckpt (a run or checkpoint folder) or --dit-checkpoint (an official DiT .pt)")
        model, checkpoint, weights = load_checkpoint_model(args.ckpt, args.weights, device)
        require_guidance_fits(model, args.cfg_scale, checkpoint)
        objective = checkpoint_objective(checkpoint, model)
        data = run_data_spec(checkpoint, getattr(args, "data", None))
        decode = LatentDecoder.for_data(data, args.vae, device)
        source = {"checkpoint": str(checkpoint), "weights": weights} | ({"vae": decode.name} if decode else {})
    if args.sampler is not None:
        objective.check_sampler(args.sampler)
    objective.check_time_shift(args.time_shift)
    return model, objective, decode, source | {"objective": objective.name}


def require_guidance_fits(model, cfg_scale: float, source) -> None:
    """MPDiTError for a guidance scale other than 1 with a model that has no null class (trained without label
    dropout, or an official DiT read with --dit-num-classes K from a table of K rows): guidance would be off."""
    if cfg_scale != 1 and model.config.class_dropout_prob == 0:
        raise MPDiTError(f"{source} has no null class (it was trained without label dropout), so classifier-free "
                         f"guidance cannot work: pass --cfg-scale 1 (not {cfg_scale:g})")


def parse_classes(spec: str | None, num: int, num_classes: int, seed: int) -> torch.Tensor:
    """Labels (num,): a comma list cycled to num, 'all' (0..K-1 cycled), or uniformly random (seeded)."""
    if spec in (None, "random"):
        return torch.randint(0, num_classes, (num,), generator=torch.Generator().manual_seed(seed + 7919))
    if spec == "all":
        return torch.arange(num) % num_classes
    try:
        classes = [int(c) for c in spec.split(",")]
    except ValueError:
        raise MPDiTError(f"--classes takes 'all', 'random' or a comma list of class indices, got '{spec}'") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise MPDiTError(f"class {bad[0]} is out of range: the model has classes 0..{num_classes - 1}")
    return torch.tensor(classes).repeat(-(-num // len(classes)))[:num]


def check_counts(args) -> None:
    """One-line errors for sample counts that cannot work (checked before any model is loaded)."""
    for option in ("num", "batch_size", "steps", "nrow"):
        value = getattr(args, option, None)
        if isinstance(value, int) and value < 1:
            raise MPDiTError(f"--{option.replace('_', '-')} must be >= 1, got {value}")


def step_spec(text: str) -> int | str:
    """--steps: a step count, or ADM's 'ddimN' (N steps at a stride of T // N, diffusers' DDIM "leading" spacing)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if text.startswith("ddim") and text[4:].isdigit():
        return text
    raise argparse.ArgumentTypeError(f"takes a step count or ddimN (ADM's DDIM spacing), got '{text}'")


def add_sampling_options(parser, num: int, steps: int) -> None:
    parser.add_argument("--ckpt", default=None, help="run folder, its checkpoints/ folder, or one step folder")
    parser.add_argument("--dit-checkpoint", default=None, metavar="PATH",
                        help="an official DiT checkpoint (e.g. DiT-XL-2-256x256.pt) instead of --ckpt")
    parser.add_argument("--dit-num-classes", type=int, default=None, metavar="K",
                        help="with --dit-checkpoint: its class count, for a DiT trained without label dropout "
                             "(default: the label table's rows minus the null class)")
    parser.add_argument("--vae", default=None,
                        help=f"AutoencoderKL for latent models: Hub id or folder (default: the data's, {DEFAULT_VAE})")
    parser.add_argument("--weights", default="auto",
                        help="raw, ema, or sigma-S.SSS (power EMA); auto: the largest sigma_rel, else raw")
    parser.add_argument("--num", type=int, default=num, help=f"number of samples (default {num})")
    samplers = "; ".join(f"{name}: {', '.join(cls.samplers)}" for name, cls in OBJECTIVES.items())
    defaults = ", ".join(f"{cls.default_sampler} ({name})" for name, cls in OBJECTIVES.items())
    parser.add_argument("--sampler", default=None,
                        help=f"the checkpoint's objective's samplers ({samplers}); default: {defaults}")
    parser.add_argument("--steps", type=step_spec, default=steps,
                        help=f"sampling steps (default {steps}; DDPM samplers space them evenly as DiT, or take ADM's "
                             "ddimN: a stride of 1000 // N, the spacing of diffusers' DDIMScheduler)")
    parser.add_argument("--cfg-scale", type=finite_float, default=DEFAULT_CFG_SCALE,
                        help=f"classifier-free guidance scale (1: none; default {DEFAULT_CFG_SCALE})")
    parser.add_argument("--time-shift", type=finite_float, default=1.0, metavar="S",
                        help="flow samplers: SD3's time shift t' = S t / (1 + (S - 1) t) (default 1: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the network (default: on CUDA, off on CPU)")


def run(args) -> int:
    check_counts(args)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise MPDiTError(f"--out must end in .png (the .npz is written beside it), got {out}")
    model, objective, decode, source = load_sampling_model(args, device_of(args.device))
    sampler = args.sampler or objective.default_sampler
    labels = parse_classes(args.classes, args.num, model.config.num_classes, args.seed)
    images = generate(model, labels, objective=objective, sampler=sampler, steps=args.steps,
                      cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size,
                      device=device_of(args.device), progress=not args.no_progress, decode=decode,
                      compile_model=args.compile, time_shift=args.time_shift)
    grid = save_grid(images, out, nrow=args.nrow or min(model.config.num_classes, 10))
    npz = save_npz(images, out.with_suffix(".npz"), labels)
    report = {"grid": str(grid), "npz": str(npz), **source, "num": len(images), "sampler": sampler,
              "steps": args.steps, "cfg_scale": args.cfg_scale, "seed": args.seed} | (
        {"time_shift": args.time_shift} if args.time_shift != 1 else {})
    print(strict_json(report, "the report") if args.json else
          f"{len(images)} samples ({sampler} {args.steps} steps, guidance {args.cfg_scale}, seed {args.seed}, "
          f"weights {source['weights']} of {source['checkpoint']}): grid {grid}, arrays {npz}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="sample images from a checkpoint", description=__doc__)
    add_sampling_options(parser, num=100, steps=50)
    parser.add_argument("--classes", default="all", help="'all' (default: 0..K-1 in turn), 'random', or '3,5,7'")
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default: min(classes, 10))")
    parser.add_argument("--out", default="samples.png", help="grid PNG path; PATH.npz is written beside it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(func=run)
