"""Apply Alembic migrations programmatically (``flplatform migrate``, ``serve``, tests).

Domains add revisions on their own branches from the foundation revision, so the target is
``heads`` (every branch), not a single ``head``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config


def migrations_dir() -> Path:
    candidates = [
        Path(os.environ["FLP_MIGRATIONS_DIR"]) if "FLP_MIGRATIONS_DIR" in os.environ else None,
        Path(__file__).resolve().parents[2] / "migrations",  # source checkout / editable install
        Path.cwd() / "migrations",  # container image: WORKDIR holds the repository
    ]
    for path in candidates:
        if path is not None and (path / "env.py").exists():
            return path
    raise RuntimeError("migrations/ not found; set FLP_MIGRATIONS_DIR")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["url"] = url
    return cfg


def head_revisions() -> list[str]:
    """The revisions ``upgrade(url)`` brings a database to (one per branch head)."""
    from alembic.script import ScriptDirectory

    return sorted(ScriptDirectory.from_config(alembic_config("")).get_heads())


def upgrade(url: str, target: str = "heads") -> None:
    """Migrate ``url`` to ``target``. Safe to call from inside a running event loop (uses a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        command.upgrade(alembic_config(url), target)
        return
    errors: list[BaseException] = []

    def _run() -> None:
        try:
            command.upgrade(alembic_config(url), target)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=_run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
