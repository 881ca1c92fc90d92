"""The broker: topic cache, batched writer, local fan-out, pings, availability bookkeeping, GC.

Hot path (one produced frame):

1. parse and validate the envelope (``envelope.validate_produced``);
2. find the topic in the per-process cache and the producer's permission in the per-socket
   cache (no query per message; caches expire after ``permission_cache_seconds`` and are
   dropped at once on grant or topic changes);
3. for storing policies, hand the row to the **writer**: one task that drains its queue and
   writes everything waiting in a single short transaction (insert, acks, ``last_ping`` /
   ``last_pong``, PostgreSQL NOTIFYs), then resolves the producers' acks and fans the
   messages out in order; for ``disabled`` the message is fanned out at once (and on
   PostgreSQL announced through the writer for the other processes);
4. fan-out puts the serialised envelope in each consumer socket's queue, bounded in messages
   and bytes, waiting for room rather than dropping; all queues of the process together hold
   at most ``consumer_queue_total_bytes`` (the socket with the largest backlog is disconnected
   to make room, see ``_make_room``).

No database session is held while a socket idles: every read or write opens a short session
from the app's sessionmaker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, event, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from flplatform.broker import envelope as env
from flplatform.broker.availability import Clock
from flplatform.broker.bus import InProcessBus, PostgresBus
from flplatform.broker.config import BrokerConfig
from flplatform.broker.connections import ConsumerConnection, ConsumerStalled, Delivery, PingRequest, Registry
from flplatform.broker.permissions import Identity, Perms, TopicInfo, resolve
from flplatform.broker.queues import QueueBudget
from flplatform.db import create_engine, create_sessionmaker
from flplatform.kit.tasks import spawn
from flplatform.orm.broker import (
    ANONYMOUS_KEY,
    BrokerDelivery,
    BrokerMessage,
    BrokerSubscription,
    BrokerTopic,
    BrokerTopicGrant,
    DispatchMode,
    ResponseTopic,
    StorePolicy,
)

log = logging.getLogger(__name__)

MESSAGES = BrokerMessage.__table__
DELIVERIES = BrokerDelivery.__table__
TOPICS = BrokerTopic.__table__


async def receive_frame(websocket: WebSocket) -> str | bytes | None:
    """The next text or binary frame of ``websocket``; None once the client disconnected."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    raw = message.get("text")
    return raw if raw is not None else (message.get("bytes") or b"")


# --------------------------------------------------------------------------- writer operations


@dataclass(slots=True)
class InsertOp:
    topic: TopicInfo
    produced: env.Produced
    user_id: uuid.UUID | None
    future: asyncio.Future[int] | None
    transient: bool = False


@dataclass(slots=True)
class AckOp:
    topic: TopicInfo
    message_uuid: uuid.UUID
    consumer_key: str


@dataclass(slots=True)
class NotifyOp:
    event: dict[str, Any]


@dataclass(slots=True)
class FlushOp:
    """Write pending last_ping/last_pong now; resolves when done."""

    future: asyncio.Future[None]


@dataclass
class _Pending:
    """A producer frame waiting for the writer; its ack is sent when ``future`` resolves."""

    future: asyncio.Future[int]
    produced: env.Produced


@dataclass
class _ProducerState:
    user: Identity
    perms: dict[uuid.UUID, tuple[Perms, float, int]] = field(default_factory=dict)


def policy_for(store_messages: StorePolicy | None, is_response: bool, config: BrokerConfig) -> StorePolicy:
    if store_messages is not None:
        return StorePolicy(store_messages)
    default = config.store_response_messages if is_response else config.store_source_messages
    return default or config.store_messages


def topic_info(row: BrokerTopic, config: BrokerConfig) -> TopicInfo:
    is_response = isinstance(row, ResponseTopic)
    return TopicInfo(
        id=row.id,
        slug=row.slug,
        is_response=is_response,
        is_public=row.is_public,
        anonymous_can_consume=row.anonymous_can_consume,
        supports_dasf=row.supports_dasf,
        store_messages=row.store_messages,
        policy=policy_for(row.store_messages, is_response, config),
        dispatch=DispatchMode(row.dispatch or DispatchMode.BROADCAST),
        owner_id=row.owner_id,
        created_at=row.created_at,
        source_id=row.is_response_for_id if is_response else None,
        requester_id=row.requester_id if is_response else None,
    )


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
        self.clock = clock or Clock()
        self.is_postgres = database_url.startswith("postgresql")
        # The writer's transactions; on SQLite its own connection (see ``_sqlite_writer``).
        self._write_engine: Any = None
        self.write_sessionmaker = sessionmaker
        if not self.is_postgres and ":memory:" not in database_url and config.sqlite_synchronous != "FULL":
            self._write_engine = _sqlite_writer(database_url, config.sqlite_synchronous)
            self.write_sessionmaker = create_sessionmaker(self._write_engine)
        self.bus: InProcessBus | PostgresBus = (
            PostgresBus(database_url) if self.is_postgres else InProcessBus()
        )
        self.registry = Registry()
        self.queue_budget = QueueBudget(config.consumer_queue_total_bytes)
        self._topics: dict[str, tuple[TopicInfo | None, float]] = {}
        self.grants_version = 0
        self._writes: asyncio.Queue[Any] = asyncio.Queue(maxsize=20 * config.write_batch_size)
        self._pings: dict[uuid.UUID, dt.datetime] = {}
        self._touches_written = 0.0
        self._pongs: dict[uuid.UUID, dt.datetime] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        # Statistics for the status API and the benchmark.
        self.stats: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.bus.start(self._on_bus_event)
        self._tasks.append(loop.create_task(self._writer(), name="broker-writer"))
        self._tasks.append(loop.create_task(self._touch_flusher(), name="broker-touches"))
        if self.config.background_tasks:
            self._tasks.append(loop.create_task(self._ping_timer(), name="broker-ping-timer"))
            self._tasks.append(loop.create_task(self._gc_sweeper(), name="broker-gc"))

    async def stop(self) -> None:
        self._stopping = True
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
        if self._write_engine is not None:
            await self._write_engine.dispose()

    # ------------------------------------------------------------------ topic and grant caches

    async def get_topic(self, slug: str, fresh: bool = False) -> TopicInfo | None:
        cached = self._topics.get(slug)
        if (
            not fresh
            and cached is not None
            and time.monotonic() - cached[1] < self.config.permission_cache_seconds
        ):
            return cached[0]
        async with self.sessionmaker() as session:
            row = (
                await session.execute(select(BrokerTopic).where(BrokerTopic.slug == slug))
            ).scalar_one_or_none()
            info = topic_info(row, self.config) if row is not None else None
        self._topics[slug] = (info, time.monotonic())
        return info

    async def get_topic_by_id(self, topic_id: uuid.UUID) -> TopicInfo | None:
        for info, _ in self._topics.values():
            if info is not None and info.id == topic_id:
                return await self.get_topic(info.slug)
        async with self.sessionmaker() as session:
            row = await session.get(BrokerTopic, topic_id)
            if row is None:
                return None
            slug = row.slug
        return await self.get_topic(slug, fresh=True)

    def forget(self, slug: str | None = None) -> None:
        """Drop cached topic data and every socket's grant cache (this process only)."""
        if slug is None:
            self._topics.clear()
        else:
            self._topics.pop(slug, None)
        self.grants_version += 1

    async def invalidate(self, slug: str | None = None) -> None:
        """Topic or grant data changed: forget here and tell the other processes."""
        self.forget(slug)
        if self.bus.cross_process:
            event: dict[str, Any] = {"k": "i"}
            if slug is not None:
                event["s"] = slug
            await self._submit(NotifyOp(event))

    async def perms_for(
        self, user: Identity, topic: TopicInfo, connected_at: dt.datetime | None = None
    ) -> Perms:
        source = await self.get_topic_by_id(topic.source_id) if topic.source_id else None
        async with self.sessionmaker() as session:
            return await resolve(session, user, topic, source, connected_at)

    async def _producer_perms(self, state: _ProducerState, topic: TopicInfo) -> Perms:
        cached = state.perms.get(topic.id)
        now = time.monotonic()
        if (
            cached is not None
            and cached[2] == self.grants_version
            and now - cached[1] < self.config.permission_cache_seconds
        ):
            return cached[0]
        perms = await self.perms_for(state.user, topic)
        state.perms[topic.id] = (perms, now, self.grants_version)
        return perms

    async def _consumer_perms(self, conn: ConsumerConnection, topic: TopicInfo) -> Perms:
        if conn.perms_fresh(topic.id, self.grants_version, self.config.permission_cache_seconds):
            assert conn.perms is not None
            return conn.perms
        perms = await self.perms_for(conn.user, topic, conn.connected_at)
        conn.perms, conn.perms_topic = perms, topic.id
        conn.perms_loaded, conn.perms_version = time.monotonic(), self.grants_version
        return perms

    # ------------------------------------------------------------------ producers

    async def producer_session(self, websocket: WebSocket, slug: str, user: Identity) -> None:
        """Serve a producer socket: every frame gets exactly one ack, in order."""
        state = _ProducerState(user)
        acks: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.config.producer_max_inflight)
        sender = asyncio.get_running_loop().create_task(self._send_acks(websocket, acks))
        try:
            while True:
                raw = await receive_frame(websocket)
                if raw is None:  # disconnected
                    break
                try:
                    item = await self._produce(state, slug, raw)
                except Exception:  # never kill the socket on one frame
                    log.exception("publishing to %s failed", slug)
                    item = env.error_ack("error: internal error while publishing")
                await acks.put(item)
                if sender.done():
                    break
        finally:
            await acks.put(None)
            try:
                await asyncio.wait_for(sender, 30)
            except (TimeoutError, Exception):
                sender.cancel()

    async def _send_acks(self, websocket: WebSocket, acks: asyncio.Queue[Any]) -> None:
        while True:
            item = await acks.get()
            if item is None:
                return
            if isinstance(item, _Pending):
                produced = item.produced
                try:
                    await item.future
                    ack = env.ok_ack(produced.message_id, produced.context, produced.has_context)
                except env.EnvelopeError as exc:
                    ack = env.error_ack(str(exc), produced.message_id, produced.context, produced.has_context)
                except Exception:
                    log.exception("storing a message failed")
                    ack = env.error_ack(
                        "error: could not store the message",
                        produced.message_id,
                        produced.context,
                        produced.has_context,
                    )
            else:
                ack = item
            if websocket.client_state != WebSocketState.CONNECTED:
                continue  # keep draining so the writer's futures are awaited
            try:
                await websocket.send_text(json.dumps(ack))
            except Exception:
                log.debug("producer socket went away before its ack", exc_info=True)

    async def _produce(self, state: _ProducerState, slug: str, raw: str | bytes) -> dict[str, Any] | _Pending:
        try:
            content = env.parse_json_object(raw, self.config.max_message_bytes)
        except env.EnvelopeError as exc:
            return env.error_ack(str(exc))
        has_context, context = "context" in content, content.get("context")
        supplied_id = content.get("messageId")

        def refuse(reason: str) -> dict[str, Any]:
            return env.error_ack(reason, supplied_id, context, has_context)

        try:
            produced = env.validate_produced(content, self.clock.now())
        except env.EnvelopeError as exc:
            return refuse(str(exc))
        topic = await self.get_topic(slug)
        if topic is None:
            if not self.config.create_topic_on_message:
                return refuse(f"error: Topic {slug} does not exist.")
            if state.user.is_anonymous:
                return refuse("error: user is not allowed to create topics.")
            topic = await self._create_topic_on_message(slug, state.user)
            if topic is None:
                return refuse(f"error: Topic {slug} could not be created.")
        perms = await self._producer_perms(state, topic)
        if not perms.produce:
            return refuse("error: user is not allowed to publish to this topic")
        if produced.response_topic is not None and produced.response_topic != slug:
            problem = await self._ensure_response_topic(produced.response_topic, topic, state.user)
            if problem is not None:
                return refuse(problem)
        produced.text = json.dumps(produced.content)
        self.stats["published"] += 1
        if topic.policy is StorePolicy.DISABLED:
            if self.bus.cross_process:
                await self._announce_unstored(topic, produced, state.user)
            await self._dispatch(topic, Delivery(topic.id, produced.message_id, produced.text))
            return env.ok_ack(produced.message_id, produced.context, produced.has_context)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._submit(InsertOp(topic, produced, state.user.id, future))
        return _Pending(future, produced)

    async def _create_topic_on_message(self, slug: str, user: Identity) -> TopicInfo | None:
        async with self.sessionmaker() as session:
            row = BrokerTopic(slug=slug, owner_id=user.id, created_at=self.clock.now())
            session.add(row)
            try:
                await session.flush()
                session.add(
                    BrokerTopicGrant(topic_id=row.id, user_id=user.id, can_produce=True, can_consume=True)
                )
                await session.commit()
            except IntegrityError:
                await session.rollback()
        await self.invalidate(slug)
        return await self.get_topic(slug, fresh=True)

    async def _ensure_response_topic(self, slug: str, source: TopicInfo, user: Identity) -> str | None:
        """Create the response topic on first use; None when fine, else the refusal text."""
        topic = await self.get_topic(slug)
        if topic is None:
            async with self.sessionmaker() as session:
                session.add(
                    ResponseTopic(
                        slug=slug,
                        is_response_for_id=source.id,
                        requester_id=user.id,
                        is_public=False,
                        supports_dasf=True,
                        created_at=self.clock.now(),
                    )
                )
                try:
                    await session.commit()
                except IntegrityError:
                    await session.rollback()
            await self.invalidate(slug)
            topic = await self.get_topic(slug, fresh=True)
        if topic is None or not topic.is_response or topic.source_id != source.id:
            return f"error: response topic {slug} collides with an existing topic"
        return None

    async def _announce_unstored(self, topic: TopicInfo, produced: env.Produced, user: Identity) -> None:
        """PostgreSQL: tell the other processes about a ``disabled`` message (small bodies inline,
        large ones through a transient row)."""
        if self._fits_notify(produced.text, topic.slug):
            await self._submit(NotifyOp(self._message_event(topic, produced.text, None)))
        else:
            await self._submit(InsertOp(topic, produced, user.id, None, transient=True))

    def _fits_notify(self, text: str, slug: str) -> bool:
        """Whether an envelope travels inline in a NOTIFY payload. The envelope text is ASCII
        (``json.dumps``), but it is embedded in the event as a JSON string, where every quote
        and backslash doubles: measure the escaped form, plus the event's other keys."""
        budget = self.config.notify_inline_bytes - 100 - len(slug)
        return len(text) <= budget and len(json.dumps(text)) <= budget

    def _message_event(self, topic: TopicInfo, text: str | None, pk: int | None) -> dict[str, Any]:
        event: dict[str, Any] = {"k": "m", "s": topic.slug, "t": str(topic.id)}
        if text is not None and self._fits_notify(text, topic.slug):
            event["c"] = text
        else:
            event["p"] = pk
        return event

    # ------------------------------------------------------------------ fan-out

    async def _dispatch(self, topic: TopicInfo, item: Delivery) -> None:
        conns = self.registry.consumers(topic.slug)
        if not conns:
            return
        if topic.dispatch is DispatchMode.SHARED:
            target = self.registry.next_shared(topic.slug)
            conns = [target] if target is not None else []
        if conns:
            await self._make_room(item)
        for conn in conns:
            try:
                await conn.enqueue(item, self.config.consumer_stall_seconds)
            except ConsumerStalled:
                await self._drop_stalled(conn)

    async def _make_room(self, item: Delivery) -> None:
        """Keep every consumer queue of the process within ``consumer_queue_total_bytes``: while
        the new message would not fit, the socket holding the most bytes (the one pinning the
        memory) is disconnected as a stalled consumer would be."""
        budget = self.queue_budget
        budget.limit = self.config.consumer_queue_total_bytes
        while budget.would_exceed(item):
            holders = [
                c for slug in self.registry.slugs() for c in self.registry.consumers(slug) if not c.closed
            ]
            largest = max(holders, key=lambda c: c.queue.bytes, default=None)
            if largest is None or largest.queue.bytes == 0:
                return  # nothing queued to give back: the message itself is the only holder
            self.stats["evicted_for_memory"] += 1
            log.warning(
                "consumer queues of this process hold %d bytes; disconnecting %s on %s (%d bytes queued)",
                budget.total,
                largest.id,
                largest.slug,
                largest.queue.bytes,
            )
            await self._drop_stalled(largest)

    async def _drop_stalled(self, conn: ConsumerConnection) -> None:
        log.warning("consumer %s on %s stalled; disconnecting it", conn.id, conn.slug)
        conn.release()
        self.registry.remove(conn)
        self.stats["stalled"] += 1
        # In the background: a peer that reads nothing can hold the close handshake for seconds,
        # and this runs on the dispatch path.
        spawn(self._close_stalled(conn), name="broker-close-stalled")

    @staticmethod
    async def _close_stalled(conn: ConsumerConnection) -> None:
        try:
            await conn.websocket.close(code=1013, reason="consumer too slow")
        except Exception:
            log.debug("closing a stalled consumer failed", exc_info=True)

    async def _on_bus_event(self, event: dict[str, Any]) -> None:
        kind = event.get("k")
        if kind == "i":
            self.forget(event.get("s"))
        elif kind == "g":
            topic = await self.get_topic(event.get("s", ""))
            if topic is not None:
                await self._ping_local(topic)
        elif kind == "m":
            slug = event.get("s", "")
            if not self.registry.has_consumers(slug):
                return
            topic = await self.get_topic(slug)
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
            await self._dispatch(topic, Delivery(topic.id, message_id, text))

    # ------------------------------------------------------------------ consumers

    async def consumer_session(
        self, websocket: WebSocket, slug: str, user: Identity, history: bool = False
    ) -> None:
        conn = ConsumerConnection(
            websocket=websocket,
            slug=slug,
            user=user,
            connected_at=self.clock.now(),
            queue_size=self.config.consumer_queue_size,
            queue_bytes=self.config.consumer_queue_bytes,
            budget=self.queue_budget,
        )
        self.registry.add(conn)
        sender: asyncio.Task[None] | None = None
        try:
            topic = await self.get_topic(slug)
            if topic is not None:
                await self._on_consumer_connect(conn, topic, history)
            sender = asyncio.get_running_loop().create_task(self._consumer_sender(conn))
            while not conn.closed:
                raw = await receive_frame(websocket)
                if raw is None:  # disconnected
                    break
                try:
                    reply = await self._consumer_frame(conn, raw)
                except Exception:
                    log.exception("consumer frame on %s failed", slug)
                    reply = env.error_ack("error: internal error while acknowledging")
                if reply is not None:
                    await websocket.send_text(json.dumps(reply))
        except WebSocketDisconnect:
            pass
        finally:
            conn.release()
            left = self.registry.remove(conn)
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if not self._stopping:
                try:
                    await self._on_consumer_left(slug, left)
                except Exception:
                    log.exception("consumer disconnect bookkeeping for %s failed", slug)

    async def _on_consumer_connect(self, conn: ConsumerConnection, topic: TopicInfo, history: bool) -> None:
        if topic.is_response:
            await self._clear_gc(topic)
        perms = await self._consumer_perms(conn, topic)
        if not perms.consume:
            return
        if topic.policy is not StorePolicy.DISABLED:
            # Acknowledgements still in this process's writer queue (a backend that acked and
            # reconnected at once) are applied before the redelivery reads, or acked messages
            # come again. (The writer never waits on this socket meanwhile: see ``enqueue``.)
            await self.flush()
        sent = 0
        async for _pk, text in self._outstanding(topic, conn.user, history, conn.connected_at):
            message_id = json.loads(text).get("messageId", "")
            conn.replayed.add(message_id)
            await conn.websocket.send_text(text)
            sent += 1
        if sent:
            self.touch_ping(topic.id)
            self.stats["redelivered"] += sent
        elif topic.supports_dasf and not topic.is_response:
            await conn.websocket.send_text(env.broker_request("api_info", self.clock.now()))

    async def _outstanding(
        self, topic: TopicInfo, user: Identity, history: bool, connected_at: dt.datetime
    ) -> Any:
        """Stored messages the identity still has to get, in table order, in chunks."""
        if topic.policy is StorePolicy.DISABLED:
            return
        key = user.key
        after = 0
        if topic.policy is StorePolicy.STORE:
            after = await self._subscription_start(topic, key, history, connected_at)
        while True:
            async with self.sessionmaker() as session:
                query = (
                    select(MESSAGES.c.id, MESSAGES.c.content)
                    .where(
                        MESSAGES.c.topic_id == topic.id,
                        MESSAGES.c.transient.is_(False),
                        MESSAGES.c.id > after,
                    )
                    .order_by(MESSAGES.c.id)
                    .limit(500)
                )
                if topic.policy in (StorePolicy.CACHEALL, StorePolicy.STORE):
                    delivered = select(DELIVERIES.c.message_pk).where(
                        DELIVERIES.c.message_pk == MESSAGES.c.id, DELIVERIES.c.consumer_key == key
                    )
                    query = query.where(~delivered.exists())
                rows = (await session.execute(query)).all()
            for pk, text in rows:
                yield pk, text
            if len(rows) < 500:
                return
            after = rows[-1][0]

    async def _subscription_start(
        self, topic: TopicInfo, key: str, history: bool, connected_at: dt.datetime
    ) -> int:
        """``store``: a consumer identity seen for the first time starts after the newest message
        published *before its socket connected* (the reference replayed the whole history);
        ``?history=all`` asks for everything. Messages published while the socket was being set
        up were delivered to it live, so they stay outstanding until acknowledged."""
        async with self.sessionmaker() as session:
            row = await session.get(BrokerSubscription, (topic.id, key))
            if row is None:
                newest = 0
                if not history:
                    newest = (
                        await session.execute(
                            select(func.max(MESSAGES.c.id)).where(
                                MESSAGES.c.topic_id == topic.id, MESSAGES.c.created_at < connected_at
                            )
                        )
                    ).scalar() or 0
                row = BrokerSubscription(topic_id=topic.id, consumer_key=key, after_message_pk=newest)
                session.add(row)
                try:
                    await session.commit()
                except IntegrityError:
                    await session.rollback()
                    row = await session.get(BrokerSubscription, (topic.id, key))
                    assert row is not None
            elif history and row.after_message_pk:
                row.after_message_pk = 0
                await session.commit()
            return 0 if history else row.after_message_pk

    async def _consumer_sender(self, conn: ConsumerConnection) -> None:
        """Drain the socket's queue (what arrived during the redelivery first)."""
        conn.start()
        while True:
            await self._send_one(conn, await conn.queue.get())

    async def _send_one(self, conn: ConsumerConnection, item: Delivery | PingRequest) -> None:
        """Permission from the socket's cache, then send."""
        websocket = conn.websocket
        if isinstance(item, PingRequest):
            topic = await self.get_topic(conn.slug)
            if topic is None or not (await self._consumer_perms(conn, topic)).consume:
                return
            self.touch_ping(topic.id)
            await websocket.send_text(env.broker_request(item.message_type, self.clock.now()))
            return
        if conn.replayed and item.message_id in conn.replayed:
            conn.replayed.discard(item.message_id)
            return
        topic = await self.get_topic(conn.slug)
        if topic is None or topic.id != item.topic_id:
            topic = await self.get_topic_by_id(item.topic_id)
            if topic is None:
                return
        if not (await self._consumer_perms(conn, topic)).consume:
            return
        await websocket.send_text(item.text)
        self.stats["delivered"] += 1
        self.touch_ping(topic.id)

    async def _consumer_frame(self, conn: ConsumerConnection, raw: str | bytes) -> dict[str, Any] | None:
        """A consumer's upstream frame: an ack ``{"messageId"}``; any frame counts as a pong."""
        topic = await self.get_topic(conn.slug)
        if topic is not None:
            self.touch_pong(topic.id)
        try:
            content = env.parse_json_object(raw, self.config.max_message_bytes)
        except env.EnvelopeError as exc:
            return env.error_ack(str(exc))
        message_id = content.get("messageId")
        if not isinstance(message_id, str):
            return env.error_ack("consumer acknowledgements need a messageId", message_id)
        try:
            message_uuid = uuid.UUID(message_id)
        except ValueError:
            return env.error_ack("messageId must be a UUID string", message_id)
        if topic is None or topic.policy is StorePolicy.DISABLED:
            return None
        if not (await self._consumer_perms(conn, topic)).consume:
            return None  # acks from sockets that may not consume are ignored
        await self._submit(AckOp(topic, message_uuid, conn.user.key))
        return None

    async def _on_consumer_left(self, slug: str, left: int) -> None:
        topic = await self.get_topic(slug)
        if topic is None:
            return  # a consumer waited on a response topic that never came (reference bug 7)
        if topic.is_response:
            if left == 0 and await self._collectable(topic):
                await self._set_gc(
                    topic, self.clock.now() + dt.timedelta(seconds=self.config.gc_delay_seconds)
                )
            return
        await self.ping_topic(topic)

    async def _collectable(self, topic: TopicInfo) -> bool:
        if topic.policy is StorePolicy.DISABLED:
            return True
        if topic.policy is not StorePolicy.CACHE:
            return False
        await self.flush()
        async with self.sessionmaker() as session:
            pending = (
                await session.execute(
                    select(func.count())
                    .select_from(MESSAGES)
                    .where(MESSAGES.c.topic_id == topic.id, MESSAGES.c.transient.is_(False))
                )
            ).scalar()
        return not pending

    async def _set_gc(self, topic: TopicInfo, when: dt.datetime) -> None:
        async with self.sessionmaker() as session:
            await session.execute(
                update(TOPICS).where(TOPICS.c.id == topic.id).values(garbage_collect_on=when)
            )
            await session.commit()

    async def _clear_gc(self, topic: TopicInfo) -> None:
        async with self.sessionmaker() as session:
            await session.execute(
                update(TOPICS)
                .where(TOPICS.c.id == topic.id, TOPICS.c.garbage_collect_on.is_not(None))
                .values(garbage_collect_on=None)
            )
            await session.commit()

    # ------------------------------------------------------------------ status-ping (pongs, api_info)

    async def status_ping_session(self, websocket: WebSocket, user: Identity) -> None:
        while True:
            raw = await receive_frame(websocket)
            if raw is None:  # disconnected
                return
            try:
                ack = await self._status_ping_frame(user, raw)
            except Exception:
                log.exception("status-ping frame failed")
                ack = env.error_ack("error: internal error")
            await websocket.send_text(json.dumps(ack))

    async def _status_ping_frame(self, user: Identity, raw: str | bytes) -> dict[str, Any]:
        try:
            content = env.parse_json_object(raw, self.config.max_message_bytes)
        except env.EnvelopeError as exc:
            return env.error_ack(str(exc))
        has_context, context = "context" in content, content.get("context")
        try:
            produced = env.validate_produced(content, self.clock.now())
        except env.EnvelopeError as exc:
            return env.error_ack(str(exc), content.get("messageId"), context, has_context)

        def refuse(reason: str) -> dict[str, Any]:
            return env.error_ack(reason, produced.message_id, context, has_context)

        properties = content.get("properties") or {}
        source = properties.get("source_topic")
        topic = await self.get_topic(source) if isinstance(source, str) else None
        if topic is None:
            return refuse("error: No source topic found.")
        if not (await self.perms_for(user, topic)).consume:
            return refuse("error: user is not allowed to answer for this topic")
        if properties.get("messageType") == "pong":
            self.touch_pong(topic.id)
        if "api_info" in properties:
            api_info = properties["api_info"]
            if isinstance(api_info, str):
                try:
                    api_info = json.loads(api_info)
                except ValueError:
                    return refuse("properties.api_info is not valid JSON")
            if not isinstance(api_info, dict):
                return refuse("properties.api_info must be a JSON object")
            async with self.sessionmaker() as session:
                await session.execute(update(TOPICS).where(TOPICS.c.id == topic.id).values(api_info=api_info))
                await session.commit()
            self.touch_pong(topic.id)
        return env.ok_ack(produced.message_id, context, has_context)

    # ------------------------------------------------------------------ pings and availability

    def touch_ping(self, topic_id: uuid.UUID) -> None:
        self._pings[topic_id] = self.clock.now()

    def touch_pong(self, topic_id: uuid.UUID) -> None:
        self._pongs[topic_id] = self.clock.now()

    async def ping_topic(self, topic: TopicInfo) -> None:
        """Set last_ping and send each consumer socket (in every process) a ping envelope."""
        if not topic.supports_dasf or topic.is_response:
            return
        self.touch_ping(topic.id)
        await self._ping_local(topic)
        if self.bus.cross_process:
            await self._submit(NotifyOp({"k": "g", "s": topic.slug}))

    async def _ping_local(self, topic: TopicInfo) -> None:
        for conn in self.registry.consumers(topic.slug):
            try:
                conn.queue.put_nowait(PingRequest("ping"))
            except asyncio.QueueFull:
                pass  # a busy consumer: its deliveries count as pings anyway

    async def ping_all(self) -> int:
        """The timer's job: every DASF source topic gets last_ping=now, and local sockets a ping."""
        now = self.clock.now()
        async with self.sessionmaker() as session:
            rows = (
                (
                    await session.execute(
                        select(TOPICS.c.slug).where(
                            TOPICS.c.supports_dasf.is_(True), TOPICS.c.kind == "topic"
                        )
                    )
                )
                .scalars()
                .all()
            )
            await session.execute(
                update(TOPICS)
                .where(TOPICS.c.supports_dasf.is_(True), TOPICS.c.kind == "topic")
                .values(last_ping=now)
            )
            await session.commit()
        for slug in rows:
            if self.registry.has_consumers(slug):
                topic = await self.get_topic(slug)
                if topic is not None:
                    await self._ping_local(topic)
        return len(rows)

    async def flush(self) -> None:
        """Write everything queued so far (last_ping/last_pong included) and wait for it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._submit(FlushOp(future))
        await future

    async def _touch_flusher(self) -> None:
        while True:
            await asyncio.sleep(self.config.touch_flush_seconds)
            if self._pings or self._pongs:
                try:
                    self._writes.put_nowait(None)  # wakes the writer, which writes the touches
                except asyncio.QueueFull:
                    pass

    async def _ping_timer(self) -> None:
        while True:
            await asyncio.sleep(self.config.ping_interval_seconds)
            try:
                await self.ping_all()
            except Exception:
                log.exception("broker ping timer failed")

    # ------------------------------------------------------------------ garbage collection

    async def sweep(self) -> list[str]:
        """Delete response topics whose GC time has come (unless a consumer is back) and old
        transient rows; returns the deleted slugs."""
        now = self.clock.now()
        async with self.sessionmaker() as session:
            # Sockets of this process keep their response topics alive (other processes do the same).
            local = [s for s in self.registry.slugs() if self.registry.has_consumers(s)]
            if local:
                await session.execute(
                    update(TOPICS)
                    .where(TOPICS.c.slug.in_(local), TOPICS.c.garbage_collect_on.is_not(None))
                    .values(garbage_collect_on=None)
                )
            due = (
                await session.execute(
                    select(TOPICS.c.id, TOPICS.c.slug).where(
                        TOPICS.c.kind == "response", TOPICS.c.garbage_collect_on <= now
                    )
                )
            ).all()
            if due:
                await session.execute(delete(TOPICS).where(TOPICS.c.id.in_([r.id for r in due])))
            await session.execute(
                delete(MESSAGES).where(
                    MESSAGES.c.transient.is_(True), MESSAGES.c.created_at < now - dt.timedelta(minutes=1)
                )
            )
            await session.commit()
        for row in due:
            await self.invalidate(row.slug)
        return [row.slug for row in due]

    async def _gc_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.config.gc_interval_seconds)
            try:
                await self.sweep()
            except Exception:
                log.exception("broker GC sweeper failed")

    # ------------------------------------------------------------------ re-send (HTTP API)

    async def resend(self, topic: TopicInfo, pk: int, text: str) -> None:
        message_id = json.loads(text).get("messageId", "")
        await self._dispatch(topic, Delivery(topic.id, message_id, text))
        if self.bus.cross_process:
            await self._submit(NotifyOp(self._message_event(topic, text, pk)))

    # ------------------------------------------------------------------ the writer

    async def _submit(self, op: Any) -> None:
        await self._writes.put(op)

    async def _writer(self) -> None:
        limit = self.config.write_batch_size
        while True:
            first = await self._writes.get()
            batch = [first]
            while len(batch) < limit:
                try:
                    batch.append(self._writes.get_nowait())
                except asyncio.QueueEmpty:
                    break
            ops = [op for op in batch if op is not None]
            try:
                await self._write(ops)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("broker writer batch failed")
                for op in ops:
                    future = getattr(op, "future", None)
                    if future is not None and not future.done():
                        future.set_exception(RuntimeError("write failed"))

    async def _write(self, ops: list[Any]) -> None:
        # Inserts and announcements keep their queue order: on PostgreSQL their NOTIFYs are sent
        # in that order, so other processes fan out in publish order (a large ``disabled`` body
        # announced through a transient row must not overtake a small one sent inline).
        stream = [op for op in ops if isinstance(op, (InsertOp, NotifyOp))]
        inserts = [op for op in stream if isinstance(op, InsertOp)]
        acks = [op for op in ops if isinstance(op, AckOp)]
        flushes = [op for op in ops if isinstance(op, FlushOp)]
        # last_ping/last_pong are written behind, at most every ``touch_flush_seconds`` (or on
        # a flush), not with every batch: they would double the statements per message.
        pings: dict[uuid.UUID, dt.datetime] = {}
        pongs: dict[uuid.UUID, dt.datetime] = {}
        if flushes or time.monotonic() - self._touches_written >= self.config.touch_flush_seconds:
            pings, self._pings = self._pings, {}
            pongs, self._pongs = self._pongs, {}
            self._touches_written = time.monotonic()
        if not (stream or acks or pings or pongs):
            self._resolve(flushes)
            return
        try:
            pks = await self._write_transaction(stream, acks, pings, pongs)
        except IntegrityError:
            # One bad row (a repeated messageId, a topic deleted meanwhile) must not fail the
            # others: write them one by one, in order, and refuse only the culprit.
            pks = []
            for op in stream:
                try:
                    pks.extend(await self._write_transaction([op], [], {}, {}))
                except IntegrityError:
                    if isinstance(op, InsertOp):
                        pks.append(None)
            for ack in acks:
                try:
                    await self._write_transaction([], [ack], {}, {})
                except IntegrityError:
                    log.info("acknowledgement for %s dropped (message gone)", ack.message_uuid)
            await self._write_transaction([], [], pings, pongs)
        delivered: list[tuple[InsertOp, int]] = []
        for op, pk in zip(inserts, pks, strict=True):
            if op.future is not None and not op.future.done():
                if pk is None:
                    op.future.set_exception(env.EnvelopeError("error: messageId already used on this topic"))
                else:
                    op.future.set_result(pk)
            if pk is not None and not op.transient:
                delivered.append((op, pk))
        self._resolve(flushes)
        for op, _pk in delivered:
            await self._dispatch(op.topic, Delivery(op.topic.id, op.produced.message_id, op.produced.text))

    @staticmethod
    def _resolve(flushes: list[FlushOp]) -> None:
        for op in flushes:
            if not op.future.done():
                op.future.set_result(None)

    async def _write_transaction(
        self,
        stream: list[InsertOp | NotifyOp],
        acks: list[AckOp],
        pings: dict[uuid.UUID, dt.datetime],
        pongs: dict[uuid.UUID, dt.datetime],
    ) -> list[int | None]:
        """One transaction: insert the stream's rows, apply acks and touches, queue the stream's
        NOTIFYs in stream order (PostgreSQL); returns the inserted primary keys in order."""
        inserts = [op for op in stream if isinstance(op, InsertOp)]
        pks: list[int | None] = []
        notifies: list[dict[str, Any]] = []
        async with self.write_sessionmaker() as session:
            if inserts:
                now = self.clock.now()
                rows = [
                    {
                        "topic_id": op.topic.id,
                        "message_id": op.produced.message_uuid,
                        "context": op.produced.request_context,
                        "user_id": op.user_id,
                        "content": op.produced.text,
                        "transient": op.transient,
                        "created_at": now,
                    }
                    for op in inserts
                ]
                result = await session.execute(
                    insert(MESSAGES).returning(MESSAGES.c.id, sort_by_parameter_order=True), rows
                )
                pks = list(result.scalars().all())
            if self.bus.cross_process:
                pk_of = {id(op): pk for op, pk in zip(inserts, pks, strict=True)}
                pk_of.update(await self._relay_copies(session, inserts))
                for op in stream:
                    if isinstance(op, InsertOp):
                        notifies.append(self._message_event(op.topic, op.produced.text, pk_of[id(op)]))
                    else:
                        notifies.append(op.event)
            if acks:
                await self._apply_acks(session, acks)
            for column, values in (("last_ping", pings), ("last_pong", pongs)):
                for topic_id, when in values.items():
                    await session.execute(
                        update(TOPICS).where(TOPICS.c.id == topic_id).values({column: when})
                    )
            if notifies:
                await self.bus.send(session, notifies)
            await session.commit()
        self.stats["write_batches"] += 1
        return pks

    async def _relay_copies(self, session: AsyncSession, inserts: list[InsertOp]) -> dict[int, int]:
        """PostgreSQL, ``cache`` bodies too large to inline in a NOTIFY: the first ack deletes the
        stored row, possibly before another process has read it, so those processes read a
        transient copy instead (swept after a minute). Returns ``id(op)`` → the copy's key."""
        copies = [
            op
            for op in inserts
            if not op.transient
            and op.topic.policy is StorePolicy.CACHE
            and not self._fits_notify(op.produced.text, op.topic.slug)
        ]
        if not copies:
            return {}
        now = self.clock.now()
        rows = [
            {
                "topic_id": op.topic.id,
                "message_id": uuid.uuid4(),  # the envelope keeps the real messageId
                "context": op.produced.request_context,
                "user_id": op.user_id,
                "content": op.produced.text,
                "transient": True,
                "created_at": now,
            }
            for op in copies
        ]
        result = await session.execute(
            insert(MESSAGES).returning(MESSAGES.c.id, sort_by_parameter_order=True), rows
        )
        return {id(op): pk for op, pk in zip(copies, result.scalars().all(), strict=True)}

    async def _apply_acks(self, session: AsyncSession, acks: list[AckOp]) -> None:
        by_topic: dict[uuid.UUID, list[AckOp]] = defaultdict(list)
        for ack in acks:
            by_topic[ack.topic.id].append(ack)
        for topic_id, items in by_topic.items():
            topic = items[0].topic
            ids = list({a.message_uuid for a in items})
            if topic.policy is StorePolicy.CACHE:
                await session.execute(
                    delete(MESSAGES).where(
                        MESSAGES.c.topic_id == topic_id,
                        MESSAGES.c.message_id.in_(ids),
                        MESSAGES.c.transient.is_(False),
                    )
                )
                continue
            found = (
                await session.execute(
                    select(MESSAGES.c.id, MESSAGES.c.message_id).where(
                        MESSAGES.c.topic_id == topic_id, MESSAGES.c.message_id.in_(ids)
                    )
                )
            ).all()
            pk_of = {row.message_id: row.id for row in found}
            rows = [
                {
                    "message_pk": pk_of[a.message_uuid],
                    "consumer_key": a.consumer_key,
                    "delivered_at": self.clock.now(),
                }
                for a in items
                if a.message_uuid in pk_of
            ]
            if not rows:
                continue
            dialect = postgresql if self.is_postgres else sqlite
            await session.execute(dialect.insert(DELIVERIES).on_conflict_do_nothing(), rows)
            if topic.policy is StorePolicy.CACHEALL:
                await self._delete_delivered_to_all(session, topic, list(pk_of.values()))

    async def _delete_delivered_to_all(self, session: AsyncSession, topic: TopicInfo, pks: list[int]) -> None:
        keys = await consumer_keys(session, topic)
        if not keys:
            await session.execute(delete(MESSAGES).where(MESSAGES.c.id.in_(pks)))
            return
        counts = (
            await session.execute(
                select(DELIVERIES.c.message_pk, func.count())
                .where(DELIVERIES.c.message_pk.in_(pks), DELIVERIES.c.consumer_key.in_(keys))
                .group_by(DELIVERIES.c.message_pk)
            )
        ).all()
        done = [pk for pk, count in counts if count >= len(keys)]
        if done:
            await session.execute(delete(MESSAGES).where(MESSAGES.c.id.in_(done)))


def _sqlite_writer(database_url: str, synchronous: str) -> Any:
    """SQLite: the broker's writer commits on its own connection with ``PRAGMA synchronous`` =
    ``NORMAL`` (default ``FLP_BROKER_SQLITE_SYNCHRONOUS``): in WAL mode a commit then skips the
    fsync (≈2 ms here), which bounds send→ack throughput. A crash of the process loses nothing
    committed; a power loss or OS crash may lose the last commits. The rest of the application
    keeps ``FULL``."""
    engine = create_engine(database_url)

    def _pragma(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.close()

    event.listen(engine.sync_engine, "connect", _pragma)
    return engine


async def consumer_keys(session: AsyncSession, topic: TopicInfo) -> list[str]:
    """The identities that must all acknowledge a ``cacheall`` message: holders of the
    ``can_consume`` grant, the anonymous identity when it may consume, and a response topic's
    requester."""
    keys = {
        str(uid)
        for uid in (
            await session.execute(
                select(BrokerTopicGrant.user_id).where(
                    and_(BrokerTopicGrant.topic_id == topic.id, BrokerTopicGrant.can_consume.is_(True))
                )
            )
        ).scalars()
    }
    if topic.anonymous_can_consume:
        keys.add(ANONYMOUS_KEY)
    if topic.is_response:
        keys.add(str(topic.requester_id) if topic.requester_id else ANONYMOUS_KEY)
    return sorted(keys)


def identity_of(user: Any) -> Identity:
    if user is None:
        return Identity()
    return Identity(id=user.id, username=user.username, is_superuser=bool(user.is_superuser))


__all__ = ["Broker", "consumer_keys", "identity_of", "policy_for", "topic_info"]
