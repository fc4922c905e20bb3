"""Evaluate a checkpoint: sample with balanced labels and score the samples against the held-out test split
(the protocol is described in `mpdit eval`'s help, mpdit/cli/eval.py)."""

import time
from pathlib import Path

import torch

from mpdit.diffusion.generate import DEFAULT_CFG_SCALE, device_of, generate
from mpdit.errors import MPDiTError
from mpdit.evaluation.classifier import NO_CLASSIFIER, scoring_classifier
from mpdit.evaluation.metrics import classifier_metrics, inception_fid, real_data_baseline, reference_images
from mpdit.training.checkpoint import load_checkpoint_model, run_data_spec


def evaluate(ckpt: str | Path, *, weights: str = "auto", num: int = 1000, sampler: str = "ddim", steps: int = 50,
             cfg_scale: float = DEFAULT_CFG_SCALE, seed: int = 0, batch_size: int = 250, device: str = "auto",
             data: str | None = None, inception: bool = False, inception_weights: str | None = None,
             baseline: bool = True, progress: bool = True, classifier: str | None = None,
             compile_model: bool | None = None) -> dict:
    """Sample, score, and return {"metrics", "baseline", "protocol"} (the protocol: this module's doc).

    ``classifier``: weights written by `mpdit classifier` (file or folder); None: the packaged MNIST one;
    "none": no classifier metrics (Inception FID alone). ``compile_model``: as `generate`'s (None: on CUDA)."""
    if num < 2:
        raise MPDiTError(f"--num must be at least 2 to compute a Fréchet distance, got {num}")
    device = device_of(device)
    model, checkpoint, weights = load_checkpoint_model(ckpt, weights, device)
    data = run_data_spec(checkpoint, data)
    num_classes = model.config.num_classes
    labels = torch.arange(num) % num_classes
    reference = reference_images(data, num, seed)
    scorer, scorer_record = None, None
    if classifier != NO_CLASSIFIER:  # checked before sampling
        scorer, scorer_record = scoring_classifier(classifier, data, reference, num_classes)
    elif not inception:
        raise MPDiTError("--classifier none leaves nothing to score: add --inception for Inception FID alone")
    start = time.perf_counter()
    images = generate(model, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                      batch_size=batch_size, device=device, progress=progress, compile_model=compile_model)
    sampling_s = time.perf_counter() - start
    metrics = {} if scorer is None else classifier_metrics(images, labels, reference.images, classifier=scorer)
    if inception:
        metrics["fid_inception"] = inception_fid(images, reference.images, weights=inception_weights,
                                                 progress=progress)
    metrics["sampling_seconds"] = round(sampling_s, 1)
    networks = [f"mpdit SmallCNN classifier {scorer_record['weights']}"] if scorer_record else []
    if inception:
        networks.append("Inception-v3 pool features (2048-d) for fid_inception")
    protocol = {
        "checkpoint": str(checkpoint), "weights": weights, "num_samples": num,
        "labels": f"balanced: sample i has class i mod {num_classes}", "sampler": sampler, "steps": steps,
        "cfg_scale": cfg_scale, "seed": seed, "data": data,
        "reference": f"{len(reference)} images of the {data} test split drawn with seed {seed}",
        "feature_network": "; ".join(networks),
        "classifier": scorer_record,
    }
    result = {"metrics": metrics, "protocol": protocol}
    if baseline:
        result["baseline"] = real_data_baseline(data, len(reference), seed, inception=inception,
                                                inception_weights=inception_weights, classifier=scorer,
                                                score_classifier=scorer is not None)
    return result
