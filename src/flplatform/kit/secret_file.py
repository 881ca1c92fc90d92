"""The secret file of the embedded default (``.flplatform-secret``): created once, 0600 from its
first byte, read once per process.

A foundation module (settings reads it for its default ``secret_key``), so it imports nothing
of flplatform's.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_FILE_SECRETS: dict[str, str] = {}
_FILE_SECRETS_LOCK = threading.Lock()


def file_secret(path: Path) -> str:
    """The secret kept in ``path``, created there if absent; read from disk once per process.

    Created 0600 from the first byte (``O_CREAT | O_EXCL``, written under a temporary name and
    hard-linked into place, so nobody ever sees it world-readable or half-written); when two
    processes race, the loser's link fails and it reads the winner's secret.
    """
    key = str(path.absolute())
    with _FILE_SECRETS_LOCK:
        cached = _FILE_SECRETS.get(key)
        if cached is None:
            cached = _FILE_SECRETS[key] = _read_secret(path) if path.exists() else _create_secret(path)
        return cached


def _read_secret(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o); chmod 600 it", path, mode)
    value = path.read_text().strip()
    if not value:
        raise RuntimeError(f"{path} is empty; remove it to generate a new secret or set FLP_SECRET_KEY")
    return value


def _create_secret(path: Path) -> str:
    value = secrets.token_urlsafe(48)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:  # another process won the race: use its secret
            return _read_secret(path)
    finally:
        temporary.unlink(missing_ok=True)
    return value
