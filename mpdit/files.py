"""Files written so that a crash never leaves a torn one: atomic writes (temp sibling, fsync, os.replace),
safetensors and weights-only torch files, with one-line errors. The ground floor: it imports nothing of mpdit
but errors, so model/, data/ and training/ all build on it.

Every write goes to a temporary sibling (``NAME.tmp-<pid>``) that is fsynced and then ``os.replace``d into place,
so a killed writer never leaves a half-written file under the final name.
"""

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mpdit.errors import MPDiTError, nonfinite_number


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


def remove_path(path: Path) -> None:
    """Delete a file, link or folder tree if it exists (a folder best effort)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class WriteFailed(OSError):
    """A write that failed inside a library (torch.save's RuntimeError, safetensors' SafetensorError: a full disk, a
    quota) as the OSError that every caller reports in one line (``strerror``: the cause, ``filename``: the path)."""


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and os.replace it onto ``path``. Every writer
    goes through here: whatever a write raises becomes an OSError (WriteFailed), and ``path`` keeps its old bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # a failing cleanup (read-only folder) must not hide the first error
            remove_path(tmp)
        if isinstance(error, Exception) and not isinstance(error, (OSError, MPDiTError)):
            cause = (str(error).strip().splitlines() or [""])[0][:200]
            raise WriteFailed(errno.EIO, f"{type(error).__name__}: {cause}", str(path)) from error
        raise
    _fsync_path(path.parent, directory=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    with _atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of ``path``; bytes that are not UTF-8 are a one-line MPDiTError naming ``what``, the path and
    the offset (a missing file stays a FileNotFoundError, for the callers that name what is missing)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise MPDiTError(f"{what} {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                         f"{error.start}): pass the right file, or rewrite it as UTF-8") from None


def parse_json(text: str, what: str):
    """json.loads(text) with one-line MPDiTErrors naming ``what``: invalid JSON, or nested too deep to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MPDiTError(f"{what} is not valid JSON ({error})") from None
    except RecursionError:
        raise MPDiTError(f"{what} is nested too deeply to read (JSON objects or lists inside each other more than "
                         "about a thousand levels): pass the right file") from None


def read_json(path: str | os.PathLike, what: str):
    """The JSON value of the file ``path`` (read_text, then parse_json): one-line errors name ``what`` and the path."""
    return parse_json(read_text(path, what), f"{what} {path}")


def read_json_lines(path: str | os.PathLike, what: str) -> list:
    """The values of a JSON-lines file (blank lines skipped), one-line errors naming the line."""
    return [parse_json(line, f"{what} {path}, line {number}")
            for number, line in enumerate(read_text(path, what).splitlines(), 1) if line.strip()]


def strict_json(value, what: str, **options) -> str:
    """json.dumps(value, **options) as strict JSON (no bare NaN or Infinity, which other readers refuse); a
    non-finite number is a one-line MPDiTError naming ``what`` and where the number is, and nothing is written."""
    bad = nonfinite_number(value)
    if bad is not None:
        raise MPDiTError(f"{what}: {bad[0]} is {bad[1]}, not a finite number, so it was not written")
    return json.dumps(value, allow_nan=False, **options)


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
    remove_path(tmp)  # leftover of an earlier crash of a process with the same pid
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
            remove_path(old)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):  # a failing cleanup (read-only folder) must not hide the first error
            if old is not None and old.exists() and not final.exists():
                os.replace(old, final)  # put the previous version back
            remove_path(tmp)
        raise
    _fsync_path(final.parent, directory=True)
    if old is not None:
        remove_path(old)


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
            raise MPDiTError(f"checkpoint file {path} holds pickled Python objects ({refused.group(1)}) that safe "
                             "loading refuses: mpdit never unpickles (that can run code), so it was not loaded; if you "
                             "trust the file, load it in Python with torch's full unpickler, keep its tensors (a state "
                             "dict, e.g. its 'ema' entry) and torch.save them to a new file") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        raise _corrupt(path, pickle.UnpicklingError(detail.group(1) if detail else text)) from None
    except Exception as error:  # zip/pickle errors, EOFError, OSError on short reads, KeyError...
        raise _corrupt(path, error) from None
