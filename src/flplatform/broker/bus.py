"""Cross-process fan-out. SQLite: one process, nothing to carry (``InProcessBus``).
PostgreSQL: LISTEN/NOTIFY on channel ``flp_broker`` (``PostgresBus``).

Events are small JSON objects ``{"o": origin, "k": kind, ...}``:

* ``m``: a message for topic ``s`` (slug) / ``t`` (topic id): ``c`` the envelope text when it
  fits in a NOTIFY payload, else ``p``, the row to read it from;
* ``g``: ping the consumers of slug ``s``;
* ``i``: topic or grant data changed (slug ``s`` or every slug): drop caches.

Message events are sent inside the writer's transaction (``pg_notify``), in publish order, so
they are delivered exactly when the row is committed and in commit order; each process handles
them one at a time and skips its own events (it dispatched locally).

**Inline envelopes, not only ids** (issue 10 sketched "payload = message id, message read from
the table"). An envelope whose text, once JSON-escaped into the event, fits in
``FLP_BROKER_NOTIFY_INLINE_BYTES`` (7,900; PostgreSQL refuses payloads of 8,000 bytes or more)
travels inline: every listening process saves one query per message, and ``disabled`` topics
write nothing for such messages. Larger envelopes carry the key of a ``broker_messages`` row:
the stored row for ``cacheall``/``store``, a transient copy for ``cache`` (its first ack deletes
the stored row, possibly before another process read it) and for ``disabled``; the sweeper
removes transient rows after a minute.
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

CHANNEL = "flp_broker"
Handler = Callable[[dict[str, Any]], Awaitable[None]]


def fits_notify(text: str, slug: str, inline_bytes: int) -> bool:
    """Whether an envelope travels inline in a NOTIFY payload. The envelope text is ASCII
    (``json.dumps``), but it is embedded in the event as a JSON string, where every quote
    and backslash doubles: measure the escaped form, plus the event's other keys."""
    budget = inline_bytes - 100 - len(slug)
    return len(text) <= budget and len(json.dumps(text)) <= budget


def message_event(
    slug: str, topic_id: uuid.UUID, text: str | None, pk: int | None, inline_bytes: int
) -> dict[str, Any]:
    """An ``m`` event: the envelope inline when it fits, else the key of the row holding it."""
    event: dict[str, Any] = {"k": "m", "s": slug, "t": str(topic_id)}
    if text is not None and fits_notify(text, slug, inline_bytes):
        event["c"] = text
    else:
        event["p"] = pk
    return event


class InProcessBus:
    """Single process: local dispatch already reached everyone; nothing to forward."""

    cross_process = False

    def __init__(self) -> None:
        self.origin = uuid.uuid4().hex[:12]

    async def start(self, handler: Handler) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, session: AsyncSession, events: list[dict[str, Any]]) -> None:
        return None


class PostgresBus:
    cross_process = True

    def __init__(self, database_url: str):
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
        await self._conn.add_listener(CHANNEL, self._on_notify)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="broker-bus")

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
                log.exception("broker bus event failed: %s", str(event)[:200])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None:
            try:
                await self._conn.remove_listener(CHANNEL, self._on_notify)
            finally:
                await self._conn.close()

    async def send(self, session: AsyncSession, events: list[dict[str, Any]]) -> None:
        """Queue NOTIFYs in the session's transaction (delivered at commit)."""
        if not events:
            return
        payloads = [json.dumps({"o": self.origin, **e}, separators=(",", ":")) for e in events]
        await session.execute(
            text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
            {"channel": CHANNEL, "payloads": payloads},
        )
