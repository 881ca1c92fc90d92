"""Async Alembic environment. The URL comes from ``config.attributes["url"]`` (tests, the CLI)
or from the settings (``FLP_DATABASE_URL``)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from flplatform.db import create_engine
from flplatform.migrate import AUTOGENERATE_OPTIONS
from flplatform.orm import Base
from flplatform.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("url") or Settings().database_url


def _configure(connection: Connection | None = None, **kw: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        **AUTOGENERATE_OPTIONS,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        **kw,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


# PostgreSQL advisory lock key (b"flp-migr"): hosts that start at the same time migrate one after
# the other; the later ones wait, then find the schema at head and do nothing.
MIGRATION_LOCK_KEY = 7380397229764863858


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
