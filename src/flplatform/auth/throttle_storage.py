"""A ``limits`` storage in flplatform's own database, so every worker process shares the login
throttle's counters without another service (``FLP_LOGIN_THROTTLE_STORAGE_URI=database``, the
default on PostgreSQL).

Fixed windows only (what flplatform.auth.login_guard uses): one row per key with its count and the
Unix time its window ends. ``incr`` is one ``INSERT … ON CONFLICT DO UPDATE … RETURNING`` (SQLite
≥ 3.35 and PostgreSQL), atomic under concurrent workers; a row whose window has ended restarts at
the increment. Ended rows are deleted by :meth:`DatabaseStorage.purge` (the login guard's periodic
task).
"""

from __future__ import annotations

import time
from typing import Any, cast

from limits.aio.storage import Storage
from sqlalchemy import Table, case, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from flplatform.orm.throttle import RateLimitCounter


class DatabaseStorage(Storage):
    STORAGE_SCHEME = ["flplatform+database"]

    def __init__(self, engine: AsyncEngine, **options: Any):
        super().__init__(None, **options)
        self.engine = engine
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return SQLAlchemyError

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        table = cast(Table, RateLimitCounter.__table__)
        insert = self._insert(table).values(key=key, count=amount, expires_at=now + expiry)
        ended = table.c.expires_at <= now
        statement = insert.on_conflict_do_update(
            index_elements=[table.c.key],
            set_={
                "count": case((ended, amount), else_=table.c.count + amount),
                "expires_at": case((ended, now + expiry), else_=table.c.expires_at),
            },
        ).returning(table.c.count)
        async with self.engine.begin() as conn:
            return int((await conn.execute(statement)).scalar_one())

    async def _row(self, key: str) -> tuple[int, float] | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(RateLimitCounter.count, RateLimitCounter.expires_at).where(
                        RateLimitCounter.key == key
                    )
                )
            ).first()
        if row is None:
            return None
        count, expires_at = row
        if expires_at <= time.time():
            return None
        return int(count), float(expires_at)

    async def get(self, key: str) -> int:
        row = await self._row(key)
        return row[0] if row else 0

    async def get_expiry(self, key: str) -> float:
        row = await self._row(key)
        return row[1] if row else time.time()

    async def check(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(select(1))
            return True
        except SQLAlchemyError:
            return False

    async def reset(self) -> int | None:
        async with self.engine.begin() as conn:
            return (await conn.execute(delete(RateLimitCounter))).rowcount

    async def clear(self, key: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(RateLimitCounter).where(RateLimitCounter.key == key))

    async def purge(self) -> int:
        """Delete the rows of windows that have ended."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(RateLimitCounter).where(RateLimitCounter.expires_at <= time.time())
            )
            return result.rowcount
