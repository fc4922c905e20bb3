"""GPU check: train a DiT on random latents with each main variant, print images/s and peak memory as JSON lines.

    python scripts/gpu_check.py                      # DiT-S/2, 4x32x32 latents, batch 256, 300 steps, bf16, cuda
    python scripts/gpu_check.py --device cpu --steps 3 --model DiT-Nano/2 --batch-size 4   # smoke test

Variants: the DiT baseline (mp none, adaln-zero, lr 1e-4), all-MP scale-shift-gate and all-MP
scale-rotation-gate (lr 1e-2, EDM2 schedule). Timing starts after --warmup steps; each line also gives the
parameter count, peak and resident (between steps) GPU memory, the last loss and whether every loss was
finite; a variant that fails prints {"variant", "error"} and the script exits with status 1. With
--check-compiled a first line says whether compiled training gives the eager weights on the device (status 1 if
not; about 30 s of compiling).
"""

import argparse
import json
import math
import sys
import time

import torch

from mpdit.diffusion.objectives import make_objective
from mpdit.model.dit import build_model
from mpdit.training.schedules import make_schedule, set_lr
from mpdit.training.train import family_optimizer, make_optimizer

VARIANTS = {"dit": dict(mp="none", conditioning="adaln-zero"),
            "mp-scale-shift-gate": dict(mp="all", conditioning="scale-shift-gate"),
            "mp-scale-rotation-gate": dict(mp="all", conditioning="scale-rotation-gate")}


def check(variant: str, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.latent_size, in_channels=4, num_classes=1000,
                        **VARIANTS[variant]).to(device)
    opt = family_optimizer(model.config)
    optimizer = make_optimizer(model.parameters(), opt["lr"], opt["betas"])
    schedule = make_schedule(opt["schedule"], opt["lr"], opt.get("warmup_steps", 200), 1000)
    objective = make_objective(None, model.config)  # DDPM
    shape = (args.batch_size, 4, args.latent_size, args.latent_size)
    x0 = torch.randn(shape, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    losses, start = [], None
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        t = torch.randint(0, 1000, (args.batch_size,), device=device)
        set_lr(optimizer, schedule(step))
        with autocast:
            loss = objective.training_losses(lambda x, s: model(x, s, y), x0, t, torch.randn_like(x0))["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    losses = [float(v) for v in losses]
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    # between steps: weights, optimizer state, gradients; the peak minus it is the step's activations and temporaries
    resident = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
    return {"variant": variant, "model": args.model, "params": model.num_params(), "latents": list(shape[1:]),
            "batch": args.batch_size, "steps": args.steps, "precision": args.precision, "device": str(device),
            "images_per_s": round(args.steps * args.batch_size / seconds, 1),
            "peak_memory_gib": None if peak is None else round(peak, 2),
            "resident_gib": None if resident is None else round(resident, 2), "final_loss": round(losses[-1], 4),
            "all_finite": all(math.isfinite(v) for v in losses)}


def compiled_matches_eager(args, steps: int = 4) -> dict:
    """Train the same small all-MP model for a few steps eagerly and under torch.compile (fp32, the device's code path,
    weights stacked on CUDA) and compare the weights: forced weight normalization mutates parameters inside the
    compiled graph, which a torch release once got wrong (docs/design-notes.md, "Compilation")."""
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls on both sides, so rounding is all that differs
    weights = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("DiT-Nano/2", input_size=8, in_channels=4, num_classes=10, mp="all",
                            conditioning="scale-rotation-gate").to(device)
        forward = torch.compile(model) if compiled else model
        optimizer = make_optimizer(model.parameters(), 1e-2, (0.9, 0.99))
        objective = make_objective(None, model.config)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x0 = torch.randn(8, 4, 8, 8, generator=gen).to(device)
            y = torch.randint(0, 10, (8,), generator=gen).to(device)
            t = torch.randint(0, 1000, (8,), generator=gen).to(device)
            noise = torch.randn(8, 4, 8, 8, generator=gen).to(device)
            loss = objective.training_losses(lambda x, s: forward(x, s, y), x0, t, noise)["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        weights.append({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    worst = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    return {"check": "compiled training equals eager", "device": str(device), "steps": steps,
            "max_weight_difference": worst, "ok": worst < 1e-3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 on GPU, 1 on CPU)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--check-compiled", action="store_true",
                        help="first check that compiled training gives the eager weights (a small model, 4 steps)")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 20 if args.device.startswith("cuda") else 1
    failed = False
    if args.check_compiled:
        equal = compiled_matches_eager(args)
        print(json.dumps(equal), flush=True)
        failed = not equal["ok"]
    for variant in args.variants.split(","):
        try:
            line = check(variant, args)
        except Exception as error:  # report the variant's failure and go on with the others
            failed, line = True, {"variant": variant, "model": args.model, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(line), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
