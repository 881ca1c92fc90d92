"""A cross-process event bus on one channel. SQLite: one process, nothing to carry
(:class:`InProcessBus`). PostgreSQL: LISTEN/NOTIFY (:class:`PostgresBus`), one listening
connection per process and channel.

Events are small JSON objects; the bus adds ``"o"``, the sending process's origin, and each
process skips its own events (it dispatched them locally). :meth:`PostgresBus.send` queues the
NOTIFYs in the caller's transaction, so they are delivered exactly when it commits, in commit
order, and never for a rolled-back transaction. Each process handles the events of one bus one
at a time, in the order they arrive.

Used by the broker's fan-out (channel ``flp_broker``, :mod:`flplatform.broker.bus`) and by the
training events (channel ``flp_training_events``, :mod:`flplatform.trainings.events`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]


class InProcessBus:
    """Single process: local dispatch already reached everyone; nothing to forward."""

    cross_process = False

    def __init__(self, channel: str = "") -> None:
        self.channel = channel
        self.origin = uuid.uuid4().hex[:12]

    async def start(self, handler: Handler) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, session: AsyncSession, events: list[dict[str, Any]]) -> None:
        return None


class PostgresBus:
    cross_process = True

    def __init__(self, database_url: str, channel: str):
        self.channel = channel
        self.origin = uuid.uuid4().hex[:12]
        self._dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._conn: Any = None
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._handler: Handler | None = None

    async def start(self, handler: Handler) -> None:
        import asyncpg

        self._handler = handler
        self._conn = await asyncpg.connect(self._dsn)
        await self._conn.add_listener(self.channel, self._on_notify)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"bus-{self.channel}")

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if event.get("o") != self.origin:
            self._queue.put_nowait(event)

    async def _run(self) -> None:
        assert self._handler is not None
        while True:
            event = await self._queue.get()
            try:
                await self._handler(event)
            except Exception:  # one bad event must not stop the fan-out
                log.exception("%s bus event failed: %s", self.channel, str(event)[:200])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None:
            try:
                await self._conn.remove_listener(self.channel, self._on_notify)
            finally:
                await self._conn.close()

    async def send(self, session: AsyncSession, events: list[dict[str, Any]]) -> None:
        """Queue NOTIFYs in the session's transaction (delivered at commit)."""
        if not events:
            return
        payloads = [json.dumps({"o": self.origin, **e}, separators=(",", ":")) for e in events]
        await session.execute(
            text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
            {"channel": self.channel, "payloads": payloads},
        )
