"""Evaluate a checkpoint: sample with balanced labels and score the samples against the held-out test split
(the protocol is described in `mpdit eval`'s help, mpdit/cli/eval.py)."""

import time
from pathlib import Path

import torch

from mpdit.diffusion.generate import DEFAULT_CFG_SCALE, device_of, generate
from mpdit.errors import MPDiTError
from mpdit.evaluation.classifier import NO_CLASSIFIER, scoring_classifier
from mpdit.evaluation.metrics import classifier_metrics, inception_fid, real_data_baseline, reference_images
from mpdit.training.checkpoint import checkpoint_objective, load_checkpoint_model, run_data_spec, run_train_config
from mpdit.training.validation import VALIDATION_IMAGES, held_out_data, validation_loss


def evaluate(ckpt: str | Path, *, weights: str = "auto", num: int = 1000, sampler: str | None = None, steps: int = 50,
             cfg_scale: float = DEFAULT_CFG_SCALE, seed: int = 0, batch_size: int = 250, device: str = "auto",
             data: str | None = None, inception: bool = False, inception_weights: str | None = None,
             baseline: bool = True, progress: bool = True, classifier: str | None = None,
             compile_model: bool | None = None, time_shift: float = 1.0) -> dict:
    """Sample, score, and return {"metrics", "baseline", "protocol"} (the protocol: this module's doc).

    ``sampler``: one of the checkpoint's objective's (None: its default); ``time_shift``: a flow sampler's.
    ``classifier``: weights written by `mpdit classifier` (file or folder); None: the packaged MNIST one;
    "none": no classifier metrics (Inception FID alone). ``compile_model``: as `generate`'s (None: on CUDA)."""
    if num < 2:
        raise MPDiTError(f"--num must be at least 2 to compute a Fréchet distance, got {num}")
    device = device_of(device)
    model, checkpoint, weights = load_checkpoint_model(ckpt, weights, device)
    objective = checkpoint_objective(checkpoint, model)
    sampler = objective.check_sampler(sampler or objective.default_sampler)
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
    images = generate(model, labels, objective=objective, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                      batch_size=batch_size, device=device, progress=progress, compile_model=compile_model,
                      time_shift=time_shift)
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
        "cfg_scale": cfg_scale, "seed": seed, "data": data, "objective": objective.name,
        **({"time_shift": time_shift} if time_shift != 1 else {}),
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


def evaluate_loss(ckpt: str | Path, *, weights: str = "auto", num: int = VALIDATION_IMAGES, seed: int = 0,
                  device: str = "auto", data: str | None = None) -> dict:
    """The validation loss of a checkpoint (mpdit.training.validation) on its run's held-out images (the --holdout
    share it kept out, else the data's test split): {"metrics": {"val_loss", "val_loss_per_level"}, "protocol"}."""
    device = device_of(device)
    model, checkpoint, weights = load_checkpoint_model(ckpt, weights, device)
    objective = checkpoint_objective(checkpoint, model)
    train_config = run_train_config(checkpoint)
    data = run_data_spec(checkpoint, data)
    holdout = train_config.get("holdout", 0.0) if data == train_config.get("data") else 0.0
    held_out = held_out_data(data, model.config.input_size, holdout)
    loss = validation_loss(model, objective, held_out, num=num, seed=seed, device=device)
    source = f"the {holdout:g} of the {data} training images the run held out" if holdout else f"the {data} test split"
    return {"metrics": {"val_loss": loss["val_loss"], "val_loss_per_level": loss["per_level"]},
            "protocol": {"checkpoint": str(checkpoint), "weights": weights, "objective": objective.name,
                         "validation_loss": {"images": f"{loss['num_images']} of {source} drawn with seed {seed}",
                                             "levels": loss["levels"], "seed": seed,
                                             "target": "the objective's own (unweighted MSE)"}}}
