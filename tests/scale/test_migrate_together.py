"""Hosts that start at the same time (`flplatform serve`/`worker` migrate first) on a fresh
PostgreSQL database: one migrates, the others wait on the advisory lock and find the schema done."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from sqlalchemy import text

from flplatform.db import create_engine

MIGRATE = "import sys; from flplatform.migrate import upgrade; upgrade(sys.argv[1])"


async def _schema(url: str) -> tuple[set[str], set[str]]:
    """(Alembic versions, table names) of a database."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            versions = set((await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars())
            tables = set(
                (
                    await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
                ).scalars()
            )
            return versions, tables
    finally:
        await engine.dispose()


@pytest.mark.slow
def test_three_processes_migrating_one_fresh_database_at_once(postgres_cluster, migrated_urls) -> None:  # type: ignore[no-untyped-def]
    if postgres_cluster is None:
        pytest.skip("PostgreSQL not available")
    url = postgres_cluster.create_database("flp_migrate_together")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=180)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    # The same schema as the session's database, migrated by one process.
    assert asyncio.run(_schema(url)) == asyncio.run(_schema(migrated_urls["postgresql"]))
