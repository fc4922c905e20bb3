"""What a command's --out may not replace: the files that a training run, a checkpoint or an exported model needs
(configs, weights, training state, log, model card), and the folders only a run writes (its checkpoints/ and
ema_snapshots/). Each check is a one-line MPDiTError naming the file or folder it would have replaced; a command's own
default outputs (eval.json beside a checkpoint) are not among them.
"""

from pathlib import Path

from mpdit.errors import MPDiTError
from mpdit.files import read_safetensors_metadata
from mpdit.training import checkpoint as ckpt
from mpdit.training.ema import SNAPSHOTS
from mpdit.training.rundir import LOCK_FILE, LOG_FILE

MODEL_CARD, EXPORT_INFO = "README.md", "mpdit.json"  # an export's card and its training config / metrics / latents
NEEDED_FILES = (ckpt.CONFIG_FILE, ckpt.TRAIN_CONFIG, ckpt.STATE_FILE, LOG_FILE, LOCK_FILE, MODEL_CARD, EXPORT_INFO)
WEIGHT_SUFFIXES = (".safetensors", ".pt")
POSTHOC_EMA = "posthoc-ema"  # the "kind" in the weights' metadata of an `mpdit ema` folder


def is_needed_file(path: Path) -> bool:
    """Whether a file's name is one that runs, checkpoints or exports need (a config, weights, the model card...)."""
    return path.name in NEEDED_FILES or path.suffix in WEIGHT_SUFFIXES


def run_store(path: str | Path) -> Path | None:
    """The checkpoints/ or ema_snapshots/ folder of a training run that ``path`` is or lies in, else None."""
    path = Path(path).absolute()
    return next((folder for folder in (path, *path.parents)
                 if folder.name in (ckpt.CHECKPOINTS, SNAPSHOTS) and (folder.parent / ckpt.TRAIN_CONFIG).is_file()),
                None)


def refuse_needed_file(path: str | Path, option: str) -> None:
    """For a file an --out names: refuse a file that exists and that a run, checkpoint or export needs."""
    path = Path(path)
    if path.is_file() and is_needed_file(path):
        raise MPDiTError(f"{option} {path} would replace {path.name}, which the run, checkpoint or exported model in "
                         f"{path.parent} needs: name another file")


def refuse_run_store(path: str | Path, option: str) -> None:
    """For a folder an --out names: refuse one that is or lies in a run's checkpoints/ or ema_snapshots/."""
    store = run_store(path)
    if store is not None:
        raise MPDiTError(f"{option} {path} is in {store}, which only its training run writes (and reads back as its "
                         "own checkpoints or snapshots): name a folder outside the run")


def refuse_export(path: str | Path, option: str, writes: str) -> None:
    """For a folder an --out names: refuse an exported model (its model card or mpdit.json) or a folder of weights
    that are not a run's, which writing ``writes`` there would replace or leave describing other weights."""
    path = Path(path)
    found = next((path / name for name in (MODEL_CARD, EXPORT_INFO) if (path / name).is_file()), None)
    if found is not None:
        raise MPDiTError(f"{option} {path} holds an exported model ({found.name}): writing {writes} there would "
                         "replace it and leave its card describing other weights; name a new folder")


def refuse_new_run_folder(path: str | Path) -> None:
    """For `mpdit train --out`: refuse a run's checkpoints/ or ema_snapshots/, an exported model, and a folder holding
    a model that is not a training run (a checkpoint, an `mpdit ema` result), whose config training would replace."""
    path = Path(path)
    refuse_run_store(path, "--out")
    refuse_export(path, "--out", "a training run")
    if (path / ckpt.CONFIG_FILE).is_file() and not (path / ckpt.TRAIN_CONFIG).is_file():
        raise MPDiTError(f"--out {path} holds a model ({ckpt.CONFIG_FILE}) that is not a training run: training there "
                         "would replace its config; name a new folder")


def refuse_foreign_weights(path: str | Path, option: str) -> None:
    """For `mpdit ema --out`: refuse a folder whose model.safetensors is not an earlier `mpdit ema` result."""
    weights = Path(path) / ckpt.MODEL_FILE
    if weights.is_file() and read_safetensors_metadata(weights).get("kind") != POSTHOC_EMA:
        raise MPDiTError(f"{option} {path} holds other weights ({weights}), not an earlier mpdit ema result: writing "
                         "the rebuilt EMA there would replace them; name a new folder")
