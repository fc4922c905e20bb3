"""Atomic, resumable checkpoint files and the run-directory layout.

Layout of a run directory::

    RUN_DIR/config.json                              model config (written by the training run)
    RUN_DIR/checkpoints/step-NNNNNNN/                one checkpoint (7-digit zero-padded step)
    RUN_DIR/ema_snapshots/step-NNNNNNN-sigma-S.SSS.safetensors   power-EMA snapshots (see ema.py)

Every write goes to a temporary sibling (``NAME.tmp-<pid>``) that is fsynced and then
``os.replace``d into place, so a killed writer never leaves a half-written checkpoint under the
final name; leftovers named ``*.tmp-*`` are ignored by the listing functions.
"""

import contextlib
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mpdit.errors import MPDiTError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


# ----------------------------------------------------------------------------- atomic writes


def _fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file or a directory entry table (best effort for directories)."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and os.replace it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a failing cleanup (read-only folder) must not hide the first error
            _remove(tmp)
        raise
    _fsync_path(path.parent, directory=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    with _atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory atomically: yields an empty temp sibling ``FINAL.tmp-<pid>`` to fill.

    On normal exit every file in it is fsynced and it is renamed to ``final``; an existing
    ``final`` is renamed aside (``FINAL.old-<pid>``), the new one renamed in, then the old one
    deleted. If the body raises, the temp dir is deleted and the exception propagates.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    _remove(tmp)  # leftover of an earlier crash of a process with the same pid
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_path(Path(root) / name)
            _fsync_path(Path(root), directory=True)
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):  # a failing cleanup (read-only folder) must not hide the first error
            if old is not None and old.exists() and not final.exists():
                os.replace(old, final)  # put the previous version back
            _remove(tmp)
        raise
    _fsync_path(final.parent, directory=True)
    if old is not None:
        _remove(old)


# ----------------------------------------------------------------------------- file formats


def _require_file(path: Path) -> None:
    if not path.exists():
        raise MPDiTError(f"no checkpoint file at {path}")
    if not path.is_file():
        raise MPDiTError(f"checkpoint path {path} is not a file")


def _corrupt(path: Path, error: BaseException) -> MPDiTError:
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return MPDiTError(f"checkpoint file {path} is corrupt or truncated ({type(error).__name__}): {reason}")


def save_safetensors(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None
) -> None:
    """Atomically write tensors (any device) as safetensors; metadata values become strings.

    Each tensor is stored as a contiguous CPU clone, so tied/shared or strided tensors are fine
    (a tied tensor is stored once per name and loads back as separate tensors).
    """
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise MPDiTError(f"cannot save {name!r} to safetensors: it is a {type(value).__name__}, not a tensor")
        tensors[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with _atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; MPDiTError if missing, corrupt or truncated."""
    path = Path(path)
    _require_file(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own error types for bad headers/short data
        raise _corrupt(path, error) from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (reads the header only)."""
    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as error:
        raise _corrupt(path, error) from None


def save_torch(path: str | os.PathLike, obj: object) -> None:
    """Atomically torch.save ``obj`` (optimizer states, RNG states, counters)."""
    with _atomic_file(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, map_location: str | torch.device | None = "cpu", weights_only: bool = True):
    """torch.load with ``weights_only=True`` (tensors, dicts, lists, numbers, strings: enough for
    optimizer and RNG states); MPDiTError if missing, corrupt, or holding other Python objects."""
    path = Path(path)
    _require_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:  # torch's text recommends weights_only=False, the unsafe way: not shown
        text = str(error)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)  # a valid file with non-allowlisted objects
        if refused:
            raise MPDiTError(f"checkpoint file {path} holds Python objects ({refused.group(1)}) that safe loading "
                             "refuses (mpdit writes only tensors and plain values there); it was not loaded") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        raise _corrupt(path, pickle.UnpicklingError(detail.group(1) if detail else text)) from None
    except Exception as error:  # zip/pickle errors, EOFError, OSError on short reads, KeyError...
        raise _corrupt(path, error) from None


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
    """Delete all but the newest ``keep`` (>= 1) checkpoints; returns the deleted paths."""
    if int(keep) != keep or keep < 1:
        raise MPDiTError(f"keep must be a positive integer (number of newest checkpoints to keep), got {keep!r}")
    doomed = [p for _step, p in list_checkpoints(run_dir)[: -int(keep)]]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


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
