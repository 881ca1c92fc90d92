"""The broker front: one ``Broker`` per process, on ``app.state.broker``.

It owns the shared pieces (sessionmaker, config, clock, bus, the registry of consumer sockets,
the process-wide queue budget, statistics) and the background tasks, and hands the work to its
parts:

* ``topics.TopicCache``: topics and permissions, cached per process (no query per message);
* ``producer.ProducerProtocol`` / ``consumer.ConsumerProtocol``: the two DASF socket protocols;
* ``writer.Writer``: one task that writes whatever is waiting in one short transaction (message
  rows, acks, ``last_ping``/``last_pong``, PostgreSQL NOTIFYs), then resolves the producers'
  acks and fans the messages out in order;
* ``fanout.FanOut``: puts a message in each consumer socket's bounded queue of this process;
* ``maintenance.Maintenance``: the status-ping socket, pings and the ping timer, the GC sweeper.

Hot path (one produced frame): the producer protocol validates the envelope, finds the topic and
its permission in the caches, and hands a storing policy's row to the writer (``disabled``:
fanned out at once, and on PostgreSQL announced through the writer); the writer commits the
batch, acks, and fans out; each consumer socket's sender checks its cached permission and sends.
Other processes get the message over the bus (``bus``) and fan it out locally
(``_on_bus_event``).

No database session is held while a socket idles: every read or write opens a short session
from the app's sessionmaker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.websockets import WebSocket

from flplatform.broker.availability import Clock
from flplatform.broker.bus import InProcessBus, PostgresBus, message_event
from flplatform.broker.config import BrokerConfig
from flplatform.broker.connections import Delivery, Registry
from flplatform.broker.consumer import ConsumerProtocol
from flplatform.broker.fanout import FanOut
from flplatform.broker.maintenance import Maintenance
from flplatform.broker.permissions import Identity, Perms, TopicInfo
from flplatform.broker.producer import ProducerProtocol
from flplatform.broker.queues import QueueBudget
from flplatform.broker.tables import MESSAGES
from flplatform.broker.topics import TopicCache
from flplatform.broker.writer import NotifyOp, Writer

log = logging.getLogger(__name__)


class Broker:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        config: BrokerConfig,
        database_url: str,
        clock: Clock | None = None,
    ):
        self.sessionmaker = sessionmaker
        self.config = config
        # The parts read ``broker.clock`` each time, never a copy: tests swap in a ``FakeClock``.
        self.clock = clock or Clock()
        self.is_postgres = database_url.startswith("postgresql")
        self.bus: InProcessBus | PostgresBus = (
            PostgresBus(database_url) if self.is_postgres else InProcessBus()
        )
        self.registry = Registry()
        self.queue_budget = QueueBudget(config.consumer_queue_total_bytes)
        # Statistics for the status API and the benchmark.
        self.stats: dict[str, int] = defaultdict(int)
        self.stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.topics = TopicCache(sessionmaker, config)
        self.fanout = FanOut(self.registry, self.queue_budget, config, self.stats)
        self.writer = Writer(self, database_url)
        self.producers = ProducerProtocol(self)
        self.consumers = ConsumerProtocol(self)
        self.maintenance = Maintenance(self)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.bus.start(self._on_bus_event)
        self._tasks.append(loop.create_task(self.writer.run(), name="broker-writer"))
        self._tasks.append(loop.create_task(self.writer.touch_flusher(), name="broker-touches"))
        if self.config.background_tasks:
            self._tasks.append(loop.create_task(self.maintenance.ping_timer(), name="broker-ping-timer"))
            self._tasks.append(loop.create_task(self.maintenance.gc_sweeper(), name="broker-gc"))

    async def stop(self) -> None:
        self.stopping = True
        try:
            await asyncio.wait_for(self.flush(), 5)
        except Exception:  # shutting down: best effort
            log.debug("broker flush at shutdown failed", exc_info=True)
        for conn in [c for slug in self.registry.slugs() for c in self.registry.consumers(slug)]:
            conn.closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.stop()
        await self.writer.close()

    # ------------------------------------------------------------------ sockets (the router calls these)

    async def producer_session(self, websocket: WebSocket, slug: str, user: Identity) -> None:
        """Serve a producer socket: every frame gets exactly one ack, in order."""
        await self.producers.session(websocket, slug, user)

    async def consumer_session(
        self, websocket: WebSocket, slug: str, user: Identity, history: bool = False
    ) -> None:
        await self.consumers.session(websocket, slug, user, history=history)

    async def status_ping_session(self, websocket: WebSocket, user: Identity) -> None:
        await self.maintenance.status_ping_session(websocket, user)

    # ------------------------------------------------------------------ topics and grants

    async def perms_for(
        self, user: Identity, topic: TopicInfo, connected_at: dt.datetime | None = None
    ) -> Perms:
        return await self.topics.perms_for(user, topic, connected_at)

    def forget(self, slug: str | None = None) -> None:
        """Drop cached topic data and every socket's grant cache (this process only)."""
        self.topics.forget(slug)

    async def invalidate(self, slug: str | None = None) -> None:
        """Topic or grant data changed: forget here and tell the other processes."""
        self.forget(slug)
        if self.bus.cross_process:
            event: dict[str, Any] = {"k": "i"}
            if slug is not None:
                event["s"] = slug
            await self.writer.submit(NotifyOp(event))

    # ------------------------------------------------------------------ writes, pings, GC

    async def flush(self) -> None:
        """Write everything queued so far (last_ping/last_pong included) and wait for it."""
        await self.writer.flush()

    def touch_ping(self, topic_id: uuid.UUID) -> None:
        self.writer.touch_ping(topic_id)

    def touch_pong(self, topic_id: uuid.UUID) -> None:
        self.writer.touch_pong(topic_id)

    async def ping_topic(self, topic: TopicInfo) -> None:
        """Set last_ping and send each consumer socket (in every process) a ping envelope."""
        await self.maintenance.ping_topic(topic)

    async def ping_all(self) -> int:
        """The timer's job: every DASF source topic gets last_ping=now, and local sockets a ping."""
        return await self.maintenance.ping_all()

    async def sweep(self) -> list[str]:
        """Delete due response topics and old transient rows; returns the deleted slugs."""
        return await self.maintenance.sweep()

    async def resend(self, topic: TopicInfo, pk: int, text: str) -> None:
        """Publish a stored envelope again (HTTP API), here and in the other processes."""
        message_id = json.loads(text).get("messageId", "")
        await self.fanout.dispatch(topic, Delivery(topic.id, message_id, text))
        if self.bus.cross_process:
            inline = self.config.notify_inline_bytes
            await self.writer.submit(NotifyOp(message_event(topic.slug, topic.id, text, pk, inline)))

    # ------------------------------------------------------------------ the other processes

    async def _on_bus_event(self, event: dict[str, Any]) -> None:
        kind = event.get("k")
        if kind == "i":
            self.forget(event.get("s"))
        elif kind == "g":
            topic = await self.topics.get(event.get("s", ""))
            if topic is not None:
                self.maintenance.ping_local(topic)
        elif kind == "m":
            slug = event.get("s", "")
            if not self.registry.has_consumers(slug):
                return
            topic = await self.topics.get(slug)
            if topic is None:
                return
            text = event.get("c")
            if text is None:
                async with self.sessionmaker() as session:
                    text = (
                        await session.execute(
                            select(MESSAGES.c.content).where(MESSAGES.c.id == event.get("p"))
                        )
                    ).scalar_one_or_none()
                if text is None:
                    return  # acknowledged (deleted) before we got here
            message_id = json.loads(text).get("messageId", "")
            await self.fanout.dispatch(topic, Delivery(topic.id, message_id, text))


__all__ = ["Broker"]
