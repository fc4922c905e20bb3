"""One training process per run folder, and the repairs it makes when it takes the folder over.

``RUN_DIR/run.lock`` holds "PID HOST" of the process training in the folder. A second process (a second
``mpdit train --out DIR`` or a ``--resume DIR`` while the run goes on) is refused with a one-line error while
that process lives; a lock left by a dead process (same host, PID gone) is taken over. A lock written on
another host cannot be checked: the error says to delete it once that run is over.

On taking a folder over, the owner removes what killed writers left (``NAME.tmp-PID`` files and folders; a
checkpoint renamed aside to ``NAME.old-PID`` during a rewrite is put back if its new version never arrived)
and cuts ``log.jsonl`` back to the steps the run resumes from, so no step is logged twice.
"""

import contextlib
import json
import os
import re
import socket
from pathlib import Path

from mpdit.errors import MPDiTError
from mpdit.files import remove_path
from mpdit.training import checkpoint as ckpt
from mpdit.training.guard import json_safe

LOCK_FILE = "run.lock"
LOG_FILE = "log.jsonl"
_LEFTOVER = re.compile(r"\.(tmp|old)-\d+")
_LEFTOVER_FOLDERS = (".", ckpt.CHECKPOINTS, "ema_snapshots", "samples")


def _alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class RunLock:
    """The lock file of a run folder; use as a context manager (acquire on enter, release on exit)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.owner = f"{os.getpid()} {socket.gethostname()}"
        self.held = False

    def _refuse_if_owned(self, text: str) -> None:
        """MPDiTError if the lock text names a live process other than this one."""
        parts = text.split()
        if len(parts) < 2 or not parts[0].isdigit():
            return  # unreadable: a writer died before finishing it
        pid, host = int(parts[0]), " ".join(parts[1:])
        if host != socket.gethostname():
            raise MPDiTError(f"{self.run_dir} is in use by process {pid} on {host} (lock file {self.path}): "
                             f"wait for that run to end, or delete {self.path} if it is no longer running")
        if pid != os.getpid() and _alive(pid):
            raise MPDiTError(f"{self.run_dir} is in use by training process {pid} (lock file {self.path}): "
                             "wait for it to end or stop it, or use another --out")

    def acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MPDiTError(f"cannot use {self.run_dir} as a run folder: {error.strerror or error}") from None
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_stale()
                continue
            except OSError as error:
                raise MPDiTError(f"cannot write in the run folder {self.run_dir}: {error.strerror or error}") from None
            try:
                os.write(fd, (self.owner + "\n").encode())
            finally:
                os.close(fd)
            self.held = True
            return
        raise MPDiTError(f"could not take the lock {self.path}: other processes keep taking it")

    def _take_over_stale(self) -> None:
        """Remove a lock whose owner is dead (MPDiTError if it lives); safe against a racing taker."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        self._refuse_if_owned(text)
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first: try again
        moved = aside.read_text()
        if moved != text:  # a live lock written meanwhile by a faster taker: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink()
            self._refuse_if_owned(moved)
            return
        aside.unlink()

    def release(self) -> None:
        """Remove the lock file if this process still owns it."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError):
            if self.path.read_text().strip() == self.owner:
                self.path.unlink()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``*.tmp-PID`` files and folders killed writers left in a run folder (call with the lock held);
    a ``NAME.old-PID`` checkpoint is renamed back to NAME if NAME is missing, else deleted. Returns what went."""
    removed = []
    for sub in _LEFTOVER_FOLDERS:
        folder = Path(run_dir) / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = _LEFTOVER.search(path.name)
            if match is None or path.name == LOCK_FILE:
                continue
            final = path.with_name(path.name[:match.start()])
            if match.group(1) == "old" and not final.exists():
                os.replace(path, final)  # the rewrite that renamed it aside never finished
                continue
            remove_path(path)
            removed.append(path)
    return removed


def trim_log(run_dir: str | os.PathLike, step: int) -> None:
    """Keep the entries of RUN_DIR/log.jsonl up to ``step`` (the step the run goes on from), as strict JSON;
    a torn last line and the entries of steps that will be trained again are dropped."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return
    text = path.read_bytes().decode("utf-8", errors="replace")  # bytes torn or foreign: their lines are dropped
    kept = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            kept.append(json.dumps(json_safe(entry)) + "\n")
    if "".join(kept) != text:
        ckpt.atomic_write_text(path, "".join(kept))
