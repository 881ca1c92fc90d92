"""Revision 0901 both ways: bytes in the database → blob store → back (on both databases)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from flplatform.db import create_engine
from flplatform.migrate import alembic_config, upgrade
from tests.test_migration_line import OLD_HEADS, TABLES, _read, _rows


@pytest.fixture
def fresh_url(db_backend: str, postgres_cluster: Any, tmp_path: Any) -> str:
    if db_backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'down.db'}"
    if postgres_cluster is None:
        pytest.skip("PostgreSQL not available")
    return str(postgres_cluster.create_database(f"flp_down_{uuid.uuid4().hex[:8]}"))


def _downgrade(url: str, target: str) -> None:
    errors: list[BaseException] = []

    def run() -> None:  # alembic's env runs its own event loop: not in this test's thread
        try:
            command.downgrade(alembic_config(url), target)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def test_0901_round_trip_keeps_every_byte(fresh_url: str) -> None:
    for revision in OLD_HEADS:
        upgrade(fresh_url, revision)
    upgrade(fresh_url, "0801")
    rows = _rows()
    engine = create_engine(fresh_url)
    try:
        async with engine.begin() as conn:
            for name, table_rows in rows.items():
                await conn.execute(sa.insert(TABLES[name]), table_rows)
        upgrade(fresh_url)  # bytes to the store, columns dropped
        async with engine.connect() as conn:
            digest = (await conn.execute(sa.text("SELECT weights_digest FROM models"))).scalar_one()
            assert len(digest) == 64
        await engine.dispose()
        _downgrade(fresh_url, "0801")  # and back into the rows
        async with engine.connect() as conn:
            assert await _read(conn, rows) == rows
    finally:
        await engine.dispose()
