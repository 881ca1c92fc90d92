"""Database plumbing that is not the ORM: the aiosqlite shutdown guard and one-call cursors."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import exc, text

from flplatform import db


async def test_a_stuck_graceful_aiosqlite_close_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # aiosqlite 0.22's close() can wait for good for a thread that a forced stop already ended
    # (omnilib/aiosqlite#369); SQLAlchemy's shielded graceful close must then give up, or asyncio's
    # shutdown (a test's teardown, `serve` on SIGTERM) waits for it forever.
    from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection

    engine = db.create_engine("sqlite+aiosqlite:///:memory:")  # installs the guard
    await engine.dispose()
    monkeypatch.setattr(db, "AIOSQLITE_CLOSE_SECONDS", 0.05)

    class NeverCloses:
        async def close(self) -> None:
            await asyncio.Event().wait()

    started = time.monotonic()
    with pytest.raises(TimeoutError):  # SQLAlchemy's terminate() then force-closes
        await AsyncAdapt_aiosqlite_connection._terminate_graceful_close(
            SimpleNamespace(_connection=NeverCloses())
        )
    assert time.monotonic() - started < 2


async def test_sqlite_statements_take_one_call_and_keep_cursor_semantics(tmp_path: Path) -> None:
    # Each statement is one call on aiosqlite's thread; rows, rowcount, lastrowid, RETURNING,
    # executemany, errors and rollback must read exactly as through SQLAlchemy's own cursor.
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}")
    calls = 0
    try:
        async with engine.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            assert raw is not None
            queue_call = raw._execute

            async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                return await queue_call(fn, *args, **kwargs)

            raw._execute = counted
            await connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
            inserted = await connection.execute(text("INSERT INTO t (v) VALUES ('a')"))
            assert inserted.lastrowid == 1 and inserted.rowcount == 1
            many = await connection.execute(
                text("INSERT INTO t (v) VALUES (:v)"), [{"v": "b"}, {"v": "c"}, {"v": "d"}]
            )
            assert many.rowcount == 3
            returned = await connection.execute(text("INSERT INTO t (v) VALUES ('e') RETURNING id, v"))
            assert returned.all() == [(5, "e")]
            before = calls
            rows = await connection.execute(text("SELECT id, v FROM t ORDER BY id"))
            assert calls == before + 1
            assert list(rows.keys()) == ["id", "v"]
            assert rows.fetchone() == (1, "a")
            assert rows.fetchmany(2) == [(2, "b"), (3, "c")]
            assert rows.fetchall() == [(4, "d"), (5, "e")]
            updated = await connection.execute(text("UPDATE t SET v = v || '!' WHERE id > 3"))
            assert updated.rowcount == 2
            with pytest.raises(exc.IntegrityError):
                await connection.execute(text("INSERT INTO t (v) VALUES ('a')"))
            await connection.commit()
            async with connection.begin():
                await connection.execute(text("DELETE FROM t"))
                await connection.rollback()
            count = await connection.execute(text("SELECT count(*) FROM t"))
            assert count.scalar_one() == 5
    finally:
        await engine.dispose()


@pytest.mark.postgres_only
async def test_a_pooled_postgresql_connection_is_pinged_only_after_sitting_idle(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.create_engine(db_url)
    pings = 0
    ping = engine.sync_engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        nonlocal pings
        pings += 1
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.sync_engine.dialect, "do_ping", counted)
    try:
        async with engine.connect() as connection:
            first = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar()
        async with engine.connect() as connection:  # used moments ago: no round trip first
            assert (await connection.execute(text("SELECT pg_backend_pid()"))).scalar() == first
        assert pings == 0
        # The server drops the pooled connection while it sits idle (a restart, an idle timeout).
        other = db.create_engine(db_url)  # a connection of its own, not the pooled one
        try:
            async with other.connect() as connection:
                await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        finally:
            await other.dispose()
        monkeypatch.setattr(db, "POOL_PING_AFTER_IDLE_SECONDS", 0.0)  # everything counts as idle
        async with engine.connect() as connection:  # pinged, found dead, replaced: no error
            assert (await connection.execute(text("SELECT pg_backend_pid()"))).scalar() != first
        assert pings >= 1
    finally:
        await engine.dispose()
