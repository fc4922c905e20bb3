"""Export of a training run or checkpoint as a ``save_pretrained`` folder (mpdit.model.hub), objective included."""

from pathlib import Path

from mpdit.data.latents import read_metadata
from mpdit.model.hub import save_pretrained
from mpdit.training.checkpoint import (checkpoint_objective, load_checkpoint_model, read_json_object, run_data_spec,
                                       run_train_config)


def export_checkpoint(ckpt: str | Path, out: str | Path, weights: str = "auto") -> Path:
    """A training run or checkpoint -> a save_pretrained folder, with the run's objective (and its diffusers
    scheduler), training config, the metrics found beside the checkpoint (fid10k.json, fid50k.json, eval.json) and
    its latent space."""
    model, checkpoint, weights = load_checkpoint_model(ckpt, weights)
    objective = checkpoint_objective(checkpoint, model)
    train_config = run_train_config(checkpoint) or None
    metrics = {name: read_json_object(checkpoint / f"{name}.json", "the metrics")["metrics"]
               for name in ("fid10k", "fid50k", "eval") if (checkpoint / f"{name}.json").is_file()}
    data = run_data_spec(checkpoint)
    latents = None
    if data.startswith("latents:"):
        meta = read_metadata(Path(data.removeprefix("latents:")).expanduser())
        latents = {key: meta[key] for key in ("vae", "channel_mean", "channel_std", "resolution")}
    return save_pretrained(model, out, train_config=train_config and {**train_config, "weights": weights},
                           metrics=metrics or None, latents=latents, objective=objective.config.to_dict(),
                           scheduler=objective.scheduler_config())
