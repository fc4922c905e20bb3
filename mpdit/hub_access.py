"""Hub downloads that fail fast and in one line: with no network (or HF_HUB_OFFLINE=1), a model id that is not in
the local cache is refused within seconds (huggingface_hub alone retries for some 30 s and then blames a missing
config.json), naming the id and how to pass a local folder instead. Imports nothing of mpdit but errors."""

import os
import socket
import urllib.parse
from collections.abc import Callable

from mpdit.errors import MPDiTError


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be used now ('HF_HUB_OFFLINE is set', 'no network: ...'), or None when a connection to its
    host opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as error:
        return f"no network: {endpoint.hostname} cannot be reached ({error.strerror or error})"
    return None


def from_hub(name: str, what: str, load: Callable[[bool], object], local: str):
    """``load(local_files_only)`` for ``name``, a local folder or a Hub id. When the Hub cannot be reached only the
    local cache is tried, and a miss is a one-line MPDiTError naming ``what``, ``name`` and ``local`` (how to pass a
    local folder)."""
    if os.path.exists(name):
        return load(False)
    unreachable = hub_unreachable()
    if unreachable is None:
        return load(False)
    try:
        return load(True)
    except Exception:  # huggingface_hub and diffusers raise several types for a cache miss
        raise MPDiTError(f"cannot get {what} '{name}' from the Hub ({unreachable}) and it is not in the local "
                         f"cache: {local}") from None
