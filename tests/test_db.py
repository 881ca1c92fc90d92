"""Database plumbing that is not the ORM: the aiosqlite shutdown guard."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

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
