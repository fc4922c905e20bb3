"""Sharing models Hub-style: save_pretrained / push_to_hub with a model card that records the objective, the
training config, the metrics and the latent space (a training checkpoint is exported by
``mpdit.training.export.export_checkpoint``).

A saved folder holds what PyTorchModelHubMixin writes (config.json, model.safetensors, README.md) plus
``mpdit.json``: {"objective", "train_config", "metrics", "latents"} where "objective" is the training objective
(mpdit.diffusion.objectives.ObjectiveConfig as a dict; none recorded: ddpm) and "latents" (for latent models)
{"vae", "channel_mean", "channel_std"}, what MPDiTPipeline needs to decode; and, as diffusers keeps it beside the
model, ``scheduler/scheduler_config.json``: the diffusers scheduler that samples the objective. Load the model
with ``MPDiT.from_pretrained(PATH or Hub id)``, the pipeline with ``MPDiTPipeline.from_pretrained_model``.
"""

import json
from pathlib import Path

from huggingface_hub import ModelCard

from mpdit.files import strict_json
from mpdit.model.dit import MPDiT

INFO_FILE = "mpdit.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
PAPER = "https://arxiv.org/abs/2505.19122"


def model_card(model: MPDiT, info: dict) -> ModelCard:
    """The mixin's card with the paper link, the model, the training config, the metrics and the latent space."""
    card = model.generate_model_card()
    cfg = model.config
    lines = ["", f"## {cfg.name}: mp={','.join(cfg.mp) or 'none'}, conditioning={cfg.conditioning}", "",
             f"Class-conditional Diffusion Transformer with magnitude preservation and rotation modulation "
             f"([paper]({PAPER})); {model.num_params():,} parameters, input {cfg.in_channels}x{cfg.input_size}x"
             f"{cfg.input_size}, {cfg.num_classes} classes.", ""]
    objective = info.get("objective") or {"objective": "ddpm"}
    lines += [f"Training objective: **{objective['objective']}** (`{json.dumps(objective)}`; "
              "docs/objectives.md of mpdit).", ""]
    for key, title in (("metrics", "Metrics"), ("train_config", "Training config"), ("latents", "Latent space")):
        if info.get(key):
            lines += [f"## {title}", "", "```json", json.dumps(info[key], indent=2), "```", ""]
    lines += ["## Use", "", "```python", "from mpdit.model.dit import MPDiT", "from mpdit.pipeline import MPDiTPipeline",
              "pipe = MPDiTPipeline.from_pretrained_model(REPO_OR_PATH, scheduler='ddim')",
              "images = pipe(class_labels=[1, 2], num_inference_steps=50, guidance_scale=1.5).images", "```", ""]
    card.text = card.text + "\n".join(lines)
    return card


def save_pretrained(model: MPDiT, path: str | Path, *, train_config: dict | None = None, metrics: dict | None = None,
                    latents: dict | None = None, objective: dict | None = None, scheduler: dict | None = None) -> Path:
    """Write PATH/config.json, model.safetensors, mpdit.json, a README.md model card and, given ``scheduler`` (a
    diffusers scheduler config with its "_class_name"), scheduler/scheduler_config.json; returns PATH."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    info = {"objective": objective, "train_config": train_config, "metrics": metrics, "latents": latents}
    (path / INFO_FILE).write_text(strict_json(info, "the model info", indent=2))
    if scheduler is not None:
        (path / SCHEDULER_CONFIG).parent.mkdir(exist_ok=True)
        (path / SCHEDULER_CONFIG).write_text(strict_json(scheduler, "the scheduler config", indent=2))
    model_card(model, info).save(path / "README.md")
    model.save_pretrained(path)  # keeps our README.md
    return path


def read_info(path: str | Path) -> dict:
    """PATH/mpdit.json of a saved model (a local folder or a Hub id); {} when there is none."""
    path = Path(path)
    if not path.is_dir():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(str(path), INFO_FILE)).parent
        except EntryNotFoundError:
            return {}
    return json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).is_file() else {}


def push_to_hub(path: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a folder written by save_pretrained (card included) to the Hub repo ``repo_id``; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message="Upload mpdit model"))
