"""Atomic, resumable checkpoint files and the run-directory layout.

Layout of a run directory::

    RUN_DIR/config.json                              model config (written by the training run)
    RUN_DIR/checkpoints/step-NNNNNNN/                one checkpoint (7-digit zero-padded step)
    RUN_DIR/ema_snapshots/step-NNNNNNN-sigma-S.SSS.safetensors   power-EMA snapshots (see ema.py)

Every write goes to a temporary sibling (``NAME.tmp-<pid>``) that is fsynced and then
``os.replace``d into place, so a killed writer never leaves a half-written checkpoint under the
final name; leftovers named ``*.tmp-*`` are ignored by the listing functions.
"""

import dataclasses
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from mpdit.diffusion.objectives import OBJECTIVE_FILE, Objective, ObjectiveConfig, make_objective
from mpdit.errors import MPDiTError
from mpdit.model.dit import MPDiT, load_model
from mpdit.model.hub import INFO_FILE

# The file helpers live on the ground floor (mpdit/files.py); imported here for the callers of this module.
from mpdit.files import (  # noqa: F401
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    load_safetensors,
    load_torch,
    read_json,
    read_safetensors_metadata,
    save_safetensors,
    save_torch,
)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_CONFIG = "train_config.json"  # the training options of a run (mpdit.training.train.TrainConfig)
STATE_FILE = "training_state.pt"  # a checkpoint's optimizer and RNG state and step
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


# ----------------------------------------------------------------------------- layout


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """RUN_DIR/checkpoints/step-NNNNNNN (step = optimizer steps done)."""
    if step < 0:
        raise MPDiTError(f"checkpoint step must be >= 0, got {step}")
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint folder path (.../step-NNNNNNN), None for any other path."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def _list_step_dirs(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None and p.is_dir()]
    return sorted(found)


def is_training_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run or one of its checkpoints (a step folder, a folder holding training
    state): writing exported or rebuilt weights there would replace the weights a --resume continues from."""
    path = Path(path)
    return checkpoint_step(path) is not None or (path / STATE_FILE).exists() or (path / CHECKPOINTS).is_dir()


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(step, path)] of complete checkpoints in RUN_DIR/checkpoints, oldest first (temp dirs ignored)."""
    return _list_step_dirs(Path(run_dir) / CHECKPOINTS)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint dir of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from: a step dir (or any dir holding model.safetensors), a
    ``checkpoints/`` dir (its newest step), or a run dir (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        if checkpoint_step(path) is not None or (path / MODEL_FILE).is_file():
            return path
        for folder in (path / CHECKPOINTS, path):
            found = _list_step_dirs(folder)
            if found:
                return found[-1][1]
    raise MPDiTError(f"no checkpoint found in {path} (expected {path}/{CHECKPOINTS}/step-NNNNNNN/)")


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` (>= 1) checkpoints; returns the deleted paths. A checkpoint that is a
    symbolic link (to a folder elsewhere) loses only its link: the folder it points to is not the run's to delete."""
    if int(keep) != keep or keep < 1:
        raise MPDiTError(f"keep must be a positive integer (number of newest checkpoints to keep), got {keep!r}")
    doomed = [p for _step, p in list_checkpoints(run_dir)[: -int(keep)]]
    for p in doomed:
        if p.is_symlink():
            p.unlink()
        else:
            shutil.rmtree(p)
    return doomed


# ----------------------------------------------------------------------------- loading a checkpoint's model


def weight_files(checkpoint: Path) -> dict[str, str]:
    """Weight choices present in a checkpoint: raw, ema (classic), sigma-S.SSS (power-function EMA)."""
    files = {"raw": MODEL_FILE}
    if (checkpoint / "ema.safetensors").is_file():
        files["ema"] = "ema.safetensors"
    for path in sorted(checkpoint.glob("ema-sigma-*.safetensors")):
        files[path.stem.removeprefix("ema-")] = path.name
    return files


def load_checkpoint_model(path: str | Path, weights: str = "auto", device: str = "cpu") -> tuple[MPDiT, Path, str]:
    """The model of a run, checkpoints or step folder, with the chosen weights.

    weights 'auto' takes the power-function EMA with the largest sigma_rel if there is one, else the raw weights.
    """
    checkpoint = resolve_checkpoint(path)
    files = weight_files(checkpoint)
    if weights == "auto":
        power = [name for name in files if name.startswith("sigma-")]
        weights = power[-1] if power else "raw"
    if weights not in files:
        raise MPDiTError(f"checkpoint {checkpoint} has no '{weights}' weights: choose one of {', '.join(files)}")
    return load_model(checkpoint, files[weights], device), checkpoint, weights


def objective_config(checkpoint: Path) -> ObjectiveConfig:
    """The objective a checkpoint was trained with: its objective.json, else its run's train_config.json, else an
    exported folder's mpdit.json; DDPM for a checkpoint that records none (every run before objectives existed)."""
    if (checkpoint / OBJECTIVE_FILE).is_file():
        return ObjectiveConfig.from_dict(read_json_object(checkpoint / OBJECTIVE_FILE, "the objective"))
    train_config = run_train_config(checkpoint)
    if train_config:
        names = [field.name for field in dataclasses.fields(ObjectiveConfig)]
        return ObjectiveConfig.from_dict({key: train_config[key] for key in names if key in train_config})
    if (checkpoint / INFO_FILE).is_file():
        return ObjectiveConfig.from_dict(read_json_object(checkpoint / INFO_FILE, "the model info").get("objective") or {})
    return ObjectiveConfig()


def run_train_config(checkpoint: Path) -> dict:
    """The training options of the run a checkpoint belongs to (its train_config.json, found in the checkpoint
    folder or the two above it), or {} for a folder that is not part of a run."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (folder / TRAIN_CONFIG).is_file():
            return read_json_object(folder / TRAIN_CONFIG, "the training config")
    return {}


def checkpoint_objective(checkpoint: Path, model: MPDiT) -> Objective:
    """The objective of a checkpoint (objective_config) for its model."""
    try:
        return make_objective(objective_config(checkpoint), model.config)
    except MPDiTError as error:
        raise MPDiTError(f"{checkpoint}: {error}") from None


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object of a file (mpdit.files.read_json), or a one-line error naming the file."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise MPDiTError(f"{what} {path} does not hold a JSON object")
    return value


def run_data_spec(checkpoint: Path, given: str | None = None) -> str:
    """The dataset a checkpoint was trained on (from its run's train_config.json), unless given."""
    return given or run_train_config(checkpoint).get("data", "mnist")


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """Python, numpy-global, torch CPU and CUDA RNG states as tensors/ints (torch.save-able, weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of capture_rng_state; CUDA states are restored when CUDA is available (as many devices as both have)."""
    try:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npy = state["numpy"]
        np.random.set_state({
            "bit_generator": npy["bit_generator"],
            "state": {"key": np.asarray(npy["key"], dtype=np.int64).astype(np.uint32), "pos": int(npy["pos"])},
            "has_gauss": int(npy["has_gauss"]),
            "gauss": float(npy["gauss"]),
        })
        torch.set_rng_state(state["torch"].cpu())
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise MPDiTError(
            f"bad RNG state in checkpoint ({type(error).__name__}: {error}); was it written by capture_rng_state?"
        ) from None
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        for index, s in enumerate(cuda):
            torch.cuda.set_rng_state(s.cpu(), index)
