"""Consumer sockets and their bounded queues (and ``receive_frame``, every broker socket's read).

Each consumer socket owns a queue bounded in messages (``consumer_queue_size``) and in bytes
(``consumer_queue_bytes``; see ``queues``). The dispatcher *waits* for room (back-pressure: the
writer, and through it the producers' in-flight windows, slow down), so no live message is ever
dropped. A consumer whose queue stays full for ``consumer_stall_seconds`` is disconnected with
close code 1013 (its stored messages are redelivered when it reconnects).

While a socket is being set up (its stored messages are redelivered first, after the writer's
pending acknowledgements are applied) nothing drains its queue yet, and waiting for room there
would stall the writer behind the very flush the set-up waits for (and every other topic of the
process with it): live messages are then queued past the socket's bounds, for at most
``consumer_stall_seconds`` (then 1013), and within the process-wide byte budget, which
disconnects the largest backlog when exceeded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket

from flplatform.broker.permissions import Identity, Perms
from flplatform.broker.queues import DeliveryQueue, QueueBudget

log = logging.getLogger(__name__)


async def receive_frame(websocket: WebSocket) -> str | bytes | None:
    """The next text or binary frame of ``websocket``; None once the client disconnected."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    raw = message.get("text")
    return raw if raw is not None else (message.get("bytes") or b"")


@dataclass(slots=True)
class Delivery:
    """A live message for a consumer socket: the envelope text, serialised once."""

    topic_id: uuid.UUID
    message_id: str
    text: str


@dataclass(slots=True)
class PingRequest:
    """Ask the socket's backend for a pong (``ping``) or its API (``api_info``)."""

    message_type: str = "ping"


class ConsumerStalled(Exception):
    pass


@dataclass(eq=False)
class ConsumerConnection:
    websocket: WebSocket
    slug: str
    user: Identity
    connected_at: dt.datetime
    queue_size: int
    queue_bytes: int = 16 * 1024**2
    budget: QueueBudget | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    queue: DeliveryQueue = field(init=False)
    # messageIds already sent by the redelivery on connect (skipped when they come live too).
    replayed: set[str] = field(default_factory=set)
    # Permission cache for this socket: (perms, topic id, loaded at, grants version).
    perms: Perms | None = None
    perms_topic: uuid.UUID | None = None
    perms_loaded: float = 0.0
    perms_version: int = -1
    closed: bool = False
    # False while the socket is being set up: nothing drains the queue yet.
    started: bool = False
    # When the queue first overflowed during the set-up (monotonic seconds).
    overflow_since: float | None = None

    def __post_init__(self) -> None:
        self.queue = DeliveryQueue(self.queue_size, self.queue_bytes, self.budget)

    def start(self) -> None:
        """The sender starts draining the queue."""
        self.started = True

    def release(self) -> None:
        """The socket is gone: give the queued bytes back to the process budget."""
        self.closed = True
        self.queue.clear()

    async def enqueue(self, item: Any, stall_seconds: float) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if not self.started:
                now = time.monotonic()
                if self.overflow_since is None:
                    self.overflow_since = now
                elif now - self.overflow_since > stall_seconds:
                    raise ConsumerStalled(self.id) from None
                self.queue.force_put(item)
                return
            try:
                await asyncio.wait_for(self.queue.put(item), stall_seconds)
            except TimeoutError:
                raise ConsumerStalled(self.id) from None

    def perms_fresh(self, topic_id: uuid.UUID, version: int, ttl: float) -> bool:
        return (
            self.perms is not None
            and self.perms_topic == topic_id
            and self.perms_version == version
            and time.monotonic() - self.perms_loaded < ttl
        )


class Registry:
    """This process's consumer sockets by topic slug (a slug may not be a topic yet)."""

    def __init__(self) -> None:
        self._by_slug: dict[str, list[ConsumerConnection]] = defaultdict(list)
        self._round_robin: dict[str, int] = defaultdict(int)

    def add(self, conn: ConsumerConnection) -> None:
        self._by_slug[conn.slug].append(conn)

    def remove(self, conn: ConsumerConnection) -> int:
        """Unregister; returns how many sockets are left on the slug."""
        conns = self._by_slug.get(conn.slug)
        if conns is None:
            return 0
        if conn in conns:
            conns.remove(conn)
        if not conns:
            self._by_slug.pop(conn.slug, None)
            self._round_robin.pop(conn.slug, None)
            return 0
        return len(conns)

    def consumers(self, slug: str) -> list[ConsumerConnection]:
        return list(self._by_slug.get(slug, ()))

    def has_consumers(self, slug: str) -> bool:
        return bool(self._by_slug.get(slug))

    def slugs(self) -> list[str]:
        return list(self._by_slug)

    def count(self, slug: str | None = None) -> int:
        if slug is not None:
            return len(self._by_slug.get(slug, ()))
        return sum(len(v) for v in self._by_slug.values())

    def next_shared(self, slug: str) -> ConsumerConnection | None:
        """Round robin over the sockets not known to lack ``consume`` (shared dispatch)."""
        conns = [
            c for c in self._by_slug.get(slug, ()) if not c.closed and (c.perms is None or c.perms.consume)
        ]
        if not conns:
            return None
        index = self._round_robin[slug] % len(conns)
        self._round_robin[slug] = index + 1
        return conns[index]
