"""Apply Alembic migrations programmatically (``flplatform migrate``, ``serve``, tests).

The revisions form one line (``tests/test_migration_line.py`` keeps it so), so the target is the
single ``head``; Alembic refuses ``head`` with an error naming the heads if a second one appears.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON


def _literal(default: str | None) -> str | None:
    return None if default is None else default.split("::")[0].strip("'")


def compare_server_default(
    context: Any,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Alembic's server-default comparison (None: use it), except for JSON on PostgreSQL: Alembic
    asks the server ``SELECT '[]'::json = '[]'`` there, and json has no equality operator."""
    if context.dialect.name == "postgresql" and isinstance(metadata_column.type, JSON):
        return _literal(inspected_default) != _literal(rendered_metadata_default)
    return None


# What `alembic revision --autogenerate` compares (migrations/env.py) and what the tests that look
# for drift between the ORM and the migrated schema compare.
AUTOGENERATE_OPTIONS: dict[str, Any] = {
    "compare_type": True,
    "compare_server_default": compare_server_default,
}


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


def head_revision() -> str:
    """The revision ``upgrade(url)`` brings a database to (raises if the line has forked)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    if head is None:
        raise RuntimeError("migrations/versions/ holds no revision")
    return head


def upgrade(url: str, target: str = "head") -> None:
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
