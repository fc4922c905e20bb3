"""`mpdit train`: train a model on a dataset (one process, or many under torchrun); `--resume DIR` continues a run.

The defaults are a plain recipe (3,000 steps, no Min-SNR weighting). `mpdit quickstart` trains with a different
one: `mpdit train --min-snr-gamma 5 --lr 3e-2 --steps 4000 --compile --out runs/quickstart`, the other options at
their defaults.

Preemption: SIGTERM (Slurm, Kubernetes, `timeout`) or SIGUSR1 (Slurm's --signal warning) finishes the current step,
writes a checkpoint, prints one line saying how to resume (`mpdit train --resume DIR`) and exits with status 143
after SIGTERM (stopped as asked) or 75 after SIGUSR1 (try again: a job script requeues); under torchrun every
process stops at the same step. The resumed run is the same, bit for bit, as one never stopped. Slurm with
requeue: docs/cluster.md.
"""

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from mpdit.cli.numbers import finite_float, finite_floats
from mpdit.data.datasets import ImageDataset, load_dataset
from mpdit.diffusion.generate import DEFAULT_CFG_SCALE, generate, grid_labels, save_grid
from mpdit.diffusion.flow import TIME_SAMPLINGS
from mpdit.diffusion.objectives import OBJECTIVES
from mpdit.errors import MPDiTError
from mpdit.files import strict_json
from mpdit.model.config import (ATTENTION_OUTPUTS, HEAD_DIM, NORMS, ZERO_INIT, DiTConfig, attention_output_setting,
                                width_overrides)
from mpdit.nn.modulation import CONDITIONINGS
from mpdit.training.checkpoint import list_checkpoints
from mpdit.training.outputs import refuse_new_run_folder
from mpdit.training.schedules import RECIPES, SCHEDULES, recipe_options
from mpdit.training.train import TrainConfig, Trainer, family_optimizer, model_config_for_data, read_run_configs

DEFAULT_STEPS = 3000


# The paper's runs (DESIGN.md; docs/gpu.md): 4x16x16 SD-VAE latents of ImageNet 128x128, batch 256, 400k steps,
# power-EMA snapshots; the optimizer is the family's (DiT: 1e-4 constant; MP: 1e-2 EDM2 schedule) with the
# schedule constants of --recipe (default edm2: EDM2's, counted in images; authors: the authors' script's).
PAPER_RUN = dict(batch_size=256, steps=400_000, ema_sigma_rels="0.05,0.10", snapshot_every=10_000,
                 ckpt_every=10_000, log_every=100, telemetry_every=1000)
PRESETS = {"paper-xs2": dict(PAPER_RUN, model="DiT-XS/2"), "paper-s4": dict(PAPER_RUN, model="DiT-S/4"),
           "paper-s2": dict(PAPER_RUN, model="DiT-S/2")}
RECIPE_KEYS = ("warmup_steps", "t_ref", "grad_clip")


def fill_unset(args, values: dict) -> None:
    """Set the options in ``values``, except those given on the command line (differing from the default)."""
    for key, value in values.items():
        if getattr(args, key) == args.option_defaults[key]:
            setattr(args, key, value)


def numbers(text: str, option: str) -> tuple[float, ...]:
    """'0.9,0.99' -> (0.9, 0.99); a one-line error naming ``option`` for anything else."""
    try:
        return finite_floats(text)
    except argparse.ArgumentTypeError:
        raise MPDiTError(f"{option} takes comma-separated finite numbers, got {text!r}") from None


def apply_recipe(args) -> None:
    """Fill warm-up, t_ref and gradient clipping from --recipe (default edm2 under a --preset) for a run on the
    edm2 schedule (the MP family's), except options given on the command line."""
    given = getattr(args, "recipe", None)
    recipe = given or ("edm2" if getattr(args, "preset", None) else None)
    if recipe is None:
        return
    if (args.schedule or family_optimizer(DiTConfig(mp=args.mp))["schedule"]) != "edm2":
        if given:
            raise MPDiTError(f"--recipe {given} sets the edm2 schedule's constants, but this run uses the "
                             "constant schedule (the DiT baseline's): drop --recipe or add --schedule edm2")
        return
    fill_unset(args, recipe_options(recipe, DEFAULT_STEPS if args.steps is None else args.steps, args.batch_size))


def build_configs(args) -> tuple[DiTConfig, TrainConfig, ImageDataset]:
    """Model and training configs from the command line, and the training data, which fixes channels, size and
    classes (loaded once here and handed to the Trainer)."""
    if getattr(args, "preset", None):
        fill_unset(args, PRESETS[args.preset])
    apply_recipe(args)
    data = load_dataset(args.data, "train", args.image_size)
    if getattr(args, "preset", None) and (data.channels, *data.resolution) != (4, 16, 16):
        raise MPDiTError(f"--preset {args.preset} trains on 4x16x16 latents: pass --data latents:PATH "
                         "(mpdit encode --resolution 128 with the SD VAE)")
    model_cfg = model_config_for_data(args.model, data, args.image_size, mp=args.mp, conditioning=args.conditioning,
                                      timestep_input=args.timestep_input, class_dropout_prob=args.class_dropout,
                                      normalize_attention_output=attention_output_setting(args.attention_output,
                                                                                          args.mp),
                                      norm=args.norm, zero_init=ZERO_INIT[args.zero_init],
                                      learn_sigma=OBJECTIVES[args.objective].learn_sigma, **width_overrides(args.width))
    size = model_cfg.input_size
    family = family_optimizer(model_cfg)
    chosen = {key: getattr(args, key) for key in ("lr", "schedule", "warmup_steps") if getattr(args, key) is not None}
    if args.betas is not None:
        chosen["betas"] = numbers(args.betas, "--betas")
    options = {**family, **chosen}
    train_cfg = TrainConfig(
        data=args.data, objective=args.objective, time_sampling=args.time_sampling, logit_mean=args.logit_mean,
        logit_std=args.logit_std, image_size=size, steps=DEFAULT_STEPS if args.steps is None else args.steps, batch_size=args.batch_size, t_ref=args.t_ref,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, min_snr_gamma=args.min_snr_gamma, ema_decay=args.ema_decay or None,
        ema_sigma_rels=numbers(args.ema_sigma_rels, "--ema-sigma-rels"),
        snapshot_every=args.snapshot_every, seed=args.seed, log_every=args.log_every,
        telemetry_every=args.telemetry_every, sample_every=args.sample_every, ckpt_every=args.ckpt_every,
        keep_checkpoints=args.keep_checkpoints, precision=args.precision, compile=args.compile, device=args.device,
        progress=not args.no_progress, max_bad_steps=args.max_bad_steps, holdout=args.holdout,
        val_every=args.val_every, **options)
    return model_cfg, train_cfg, data


def sample_grid_callback(per_class: int = 2, steps: int = 50, cfg_scale: float = DEFAULT_CFG_SCALE):
    """A callback for Trainer.run that writes RUN_DIR/samples/step-NNNNNNN.png from the current raw weights, with the
    run's objective's default sampler."""

    def write(trainer: Trainer) -> None:
        cfg = trainer.model_cfg
        labels = grid_labels(cfg.num_classes, per_class)
        images = generate(trainer.model, labels, objective=trainer.objective, steps=steps, cfg_scale=cfg_scale,
                          seed=trainer.cfg.seed, device=trainer.dist.device)
        path = trainer.run_dir / "samples" / f"step-{trainer.step:07d}.png"
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")  # a killed write leaves no torn grid
        save_grid(images, tmp, nrow=min(cfg.num_classes, 10))
        os.replace(tmp, path)

    return write


# What --resume may change: when and how the run reports and saves, never what it trains.
RESUME_OPTIONS = ("steps", "log_every", "telemetry_every", "sample_every", "ckpt_every", "keep_checkpoints", "device",
                  "compile", "max_bad_steps", "val_every")
NOT_OPTIONS = {"resume", "from_step", "no_progress", "json", "func", "option_defaults", "command", "given"}


def resume_overrides(args) -> dict:
    """The TrainConfig changes the command line asks of a --resume; MPDiTError naming any option that would change
    what the run trains (they are fixed by RUN_DIR/config.json and train_config.json)."""
    given = sorted(getattr(args, "given", set()) - NOT_OPTIONS)
    refused = [name for name in given if name not in RESUME_OPTIONS]
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        allowed = ", ".join("--" + name.replace("_", "-") for name in [*RESUME_OPTIONS, "no_progress", "json", "from_step"])
        raise MPDiTError(f"--resume continues a run as it was set up, so {flags} cannot be given (it would change the "
                         f"run; start a new one with --out for that); allowed with --resume: {allowed}")
    overrides = {name: getattr(args, name) for name in given}
    if args.no_progress:
        overrides["progress"] = False
    return overrides


def run(args) -> int:
    if args.from_step is not None and not args.resume:
        raise MPDiTError("--from-step goes with --resume DIR")
    if args.resume:
        run_dir = Path(args.resume)
        model_cfg, train_cfg = read_run_configs(run_dir)
        if not list_checkpoints(run_dir):
            raise MPDiTError(f"{run_dir} has no checkpoint to resume from (the run stopped before its first one): "
                             f"start it again with --out {run_dir}")
        at = args.from_step if args.from_step is not None else list_checkpoints(run_dir)[-1][0]
        if args.steps is not None and args.steps < at:
            raise MPDiTError(f"--steps {args.steps} is below step {at:,}, where {run_dir} is: a run only goes forward "
                             f"(give --steps {at} or more, or --from-step N to resume an earlier checkpoint)")
        train_cfg = TrainConfig.from_dict({**dataclasses.asdict(train_cfg), **resume_overrides(args)})
        trainer = Trainer(run_dir, model_cfg, train_cfg, resume=True, from_step=args.from_step)
    else:
        if args.out is None:
            raise MPDiTError("give --out DIR for a new run, or --resume DIR to continue one")
        run_dir = Path(args.out)
        if list_checkpoints(run_dir):
            raise MPDiTError(f"{run_dir} already holds a run: use --resume {run_dir} or another --out")
        refuse_new_run_folder(run_dir)
        model_cfg, train_cfg, data = build_configs(args)
        trainer = Trainer(run_dir, model_cfg, train_cfg, data=data)
    if trainer.dist.is_main:
        print(f"model {model_cfg.name} mp={','.join(model_cfg.mp) or 'none'} conditioning={model_cfg.conditioning}: "
              f"{trainer.model.num_params():,} parameters; data {train_cfg.data} ({len(trainer.data)} images); "
              f"lr {train_cfg.lr} {train_cfg.schedule}; device {trainer.dist.device} x{trainer.dist.world_size}")
    try:
        last = trainer.run(sample_grid_callback())
    finally:
        if torch.distributed.is_initialized():  # leave the process group cleanly (gloo aborts at exit otherwise)
            torch.distributed.destroy_process_group()
    if trainer.dist.is_main:
        report = {"run": str(run_dir), "checkpoint": str(last), "log": str(run_dir / "log.jsonl"),
                  "samples": str(run_dir / "samples"), "step": trainer.step}
        print(strict_json(report, "the report") if args.json else
              f"trained to step {trainer.step:,}: checkpoint {last}; log {report['log']}; sample grids {report['samples']}")
    return 0


def add_model_options(parser) -> None:
    parser.add_argument("--model", default="DiT-Micro/4", help="zoo name (default DiT-Micro/4; see mpdit params)")
    parser.add_argument("--mp", default="all", help="all, none, or a comma list of switches (default all)")
    parser.add_argument("--conditioning", default="scale-rotation-gate", choices=list(CONDITIONINGS),
                        metavar="NAME", help=f"{', '.join(CONDITIONINGS)} (default scale-rotation-gate)")
    parser.add_argument("--timestep-input", default="log-sigma", choices=["log-sigma", "raw"],
                        help="MP timestep embedder input: EDM2's ln(sigma)/4 (default) or the raw step (ablation)")
    parser.add_argument("--class-dropout", type=finite_float, default=0.1, help="label dropout for guidance (default 0.1)")
    parser.add_argument("--attention-output", choices=ATTENTION_OUTPUTS, default="normalized",
                        help="cosine attention: rescale each head's output to RMS 1 (normalized, default; our "
                             "addition) or not (plain: the paper's exact model)")
    parser.add_argument("--norm", choices=NORMS, default="layernorm",
                        help="what stands where DiT has a LayerNorm: layernorm (default) or dyt (DynamicTanh, "
                             "tanh(alpha x), alpha from 0.5); needs mp switches without no_layernorm (e.g. --mp none)")
    parser.add_argument("--width", type=int, default=None, metavar="N",
                        help=f"hidden size N instead of the zoo model's, with heads of dimension {HEAD_DIM} (N / "
                             f"{HEAD_DIM} heads; default: the zoo model's)")
    parser.add_argument("--zero-init", choices=["on", "off"], default=None,
                        help="zero-initialise DiT's adaLN projections and final linear (default on; off with "
                             "--norm dyt, as DyT's DiT recipe)")


def add_training_options(parser) -> None:
    parser.add_argument("--data", default="mnist", help="mnist (default), idx:PATH, folder:PATH or latents:PATH")
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="ddpm",
                        help="ddpm (default: DiT's epsilon prediction, learned variance) or flow (flow matching: "
                             "x_t = (1 - t) x0 + t eps, velocity eps - x0; see docs/objectives.md)")
    parser.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default="logit-normal",
                        help="flow: training times logit-normal (default, SD3's) or uniform (SiT's)")
    parser.add_argument("--logit-mean", type=finite_float, default=0.0, help="flow, logit-normal times: mean (default 0)")
    parser.add_argument("--logit-std", type=finite_float, default=1.0, help="flow, logit-normal times: std (default 1)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pad/resize images to this side (default: the data's side, padded to the patch size)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps (default {DEFAULT_STEPS}; with --resume: the run's own, or extend to N)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split across processes (default 64)")
    parser.add_argument("--lr", type=finite_float, default=None, help="learning rate (default 1e-2 for MP models, 1e-4 for DiT)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None,
                        help="learning-rate schedule (default edm2 for MP models, constant for DiT)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear learning-rate warm-up steps (default 200 for MP models, 0 for DiT)")
    parser.add_argument("--t-ref", type=int, default=1000,
                        help="edm2 schedule: decay as 1/sqrt(step/t_ref) after t_ref steps (default 1000)")
    parser.add_argument("--betas", default=None, help="Adam betas 'b1,b2' (default 0.9,0.99 MP; 0.9,0.999 DiT)")
    parser.add_argument("--weight-decay", type=finite_float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--grad-clip", type=finite_float, default=None,
                        help="clip the gradient norm to this (default: no clipping)")
    parser.add_argument("--min-snr-gamma", type=finite_float, default=0.0,
                        help="weight the mse term by min(SNR, gamma) / SNR (Min-SNR; default 0: off, as DiT; "
                             "the quickstart uses 5)")
    parser.add_argument("--ema-decay", type=finite_float, default=0.9999, help="classic EMA decay (default 0.9999; 0 disables)")
    parser.add_argument("--ema-sigma-rels", default="0.05,0.10",
                        help="power-function EMA sigma_rel list (default 0.05,0.10; empty disables)")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="steps between power-EMA snapshots for mpdit ema (default 0: at checkpoints)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization, data order and noise (default 0)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between log.jsonl lines (default 50)")
    parser.add_argument("--telemetry-every", type=int, default=200,
                        help="steps between activation / weight magnitude records in the log (default 200; 0: never)")
    parser.add_argument("--sample-every", type=int, default=0,
                        help="steps between sample grids samples/step-N.png (default 0: only at the end)")
    parser.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints (default 500)")
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (default 3; 0: all)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 (default) or bf16 autocast")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on CUDA, off on CPU)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-bad-steps", type=int, default=10,
                        help="stop when this many steps in a row had a non-finite loss or gradient (default 10): "
                             "such steps are skipped (the EMAs still count them, averaging the unchanged weights); "
                             "the count is read at log, checkpoint and snapshot steps, so the run stops at the "
                             "first of those after N bad steps in a row (--log-every 1: at the N-th)")
    parser.add_argument("--holdout", type=finite_float, default=0.0, metavar="FRACTION",
                        help="keep this share of the training images (a fixed draw, the same for every run) out of "
                             "training, as the held-out images of the validation loss where the data has no test "
                             "split (default 0)")
    parser.add_argument("--val-every", type=int, default=0, metavar="N",
                        help="log the validation loss of the raw weights every N steps (mpdit eval --loss's; "
                             "default 0: never)")
    parser.add_argument("--json", action="store_true", help="print the final report as one JSON object")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    add_training_options(parser)
    parser.add_argument("--out", default=None, help="run folder for a new run")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the run in DIR with its own settings (optionally --steps N; "
                             "options that would change the run are refused)")
    parser.add_argument("--from-step", type=int, default=None, metavar="N",
                        help="with --resume: continue from the checkpoint of step N (the later ones are set aside)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="the paper's runs on 4x16x16 latents (model, batch 256, 400k steps, EMA snapshots); "
                             "combine with --mp/--conditioning; options given explicitly win (see docs/gpu.md)")
    parser.add_argument("--recipe", choices=RECIPES, default=None,
                        help="edm2-schedule constants for N = --steps: authors (the paper authors' script: warm-up "
                             "N/150, 1/sqrt decay from N/10, gradient clip 0.1) or edm2 (EDM2's, counted in images; "
                             "the presets' default); options given explicitly win")
    keys = {key for preset in PRESETS.values() for key in preset} | set(RECIPE_KEYS)
    parser.set_defaults(func=run, cpu_heavy=True, option_defaults={key: parser.get_default(key) for key in keys},
                        given=frozenset())
    record_given_options(parser)


def _record_call(self, parser, namespace, values, option_string=None):
    namespace.given = frozenset(getattr(namespace, "given", ())) | {self.dest}
    super(type(self), self).__call__(parser, namespace, values, option_string)


def record_given_options(parser: argparse.ArgumentParser) -> None:
    """Make each option of ``parser`` add its dest to ``args.given`` when the command line gives it (what --resume
    checks: a value equal to the default still counts as given)."""
    subclasses = {}
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            base = type(action)
            if base not in subclasses:
                subclasses[base] = type(f"Recorded{base.__name__}", (base,), {"__call__": _record_call})
            action.__class__ = subclasses[base]
