"""The consumer protocol: a socket that receives a topic's messages and acknowledges them.

On connect the socket is registered (live messages queue up from then on), the writer's pending
acks are applied, and the identity's outstanding stored messages are redelivered in table order
(``store``: from its subscription start); a DASF source topic with nothing to redeliver gets an
``api_info`` request. Then a sender task drains the socket's queue, checking the socket's cached
permission before each send. Upstream frames are acks (``{"messageId"}``, handed to the writer);
any frame counts as a pong. When the last consumer leaves a collectable response topic, the topic
is scheduled for GC; leaving a source topic pings it (availability changes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from starlette.websockets import WebSocket, WebSocketDisconnect

from flplatform.broker import envelope as env
from flplatform.broker.connections import ConsumerConnection, Delivery, PingRequest, receive_frame
from flplatform.broker.permissions import Identity, Perms, TopicInfo
from flplatform.broker.tables import DELIVERIES, MESSAGES, TOPICS
from flplatform.broker.writer import AckOp
from flplatform.kit import metrics
from flplatform.orm.broker import BrokerSubscription, StorePolicy

if TYPE_CHECKING:
    from flplatform.broker.core import Broker

log = logging.getLogger(__name__)


class ConsumerProtocol:
    def __init__(self, broker: Broker):
        self.broker = broker

    async def session(self, websocket: WebSocket, slug: str, user: Identity, history: bool = False) -> None:
        broker = self.broker
        conn = ConsumerConnection(
            websocket=websocket,
            slug=slug,
            user=user,
            connected_at=broker.clock.now(),
            queue_size=broker.config.consumer_queue_size,
            queue_bytes=broker.config.consumer_queue_bytes,
            budget=broker.queue_budget,
        )
        broker.registry.add(conn)
        metrics.BROKER_CONSUMERS.inc()
        sender: asyncio.Task[None] | None = None
        try:
            topic = await broker.topics.get(slug)
            if topic is not None:
                await self._on_connect(conn, topic, history)
            sender = asyncio.get_running_loop().create_task(self._sender(conn))
            while not conn.closed:
                raw = await receive_frame(websocket)
                if raw is None:  # disconnected
                    break
                try:
                    reply = await self._frame(conn, raw)
                except Exception:
                    log.exception("consumer frame on %s failed", slug)
                    reply = env.error_ack("error: internal error while acknowledging")
                if reply is not None:
                    await websocket.send_text(json.dumps(reply))
        except WebSocketDisconnect:
            pass
        finally:
            conn.release()
            left = broker.registry.remove(conn)
            metrics.BROKER_CONSUMERS.dec()
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if not broker.stopping:
                try:
                    await self._on_left(slug, left)
                except Exception:
                    log.exception("consumer disconnect bookkeeping for %s failed", slug)

    async def _perms(self, conn: ConsumerConnection, topic: TopicInfo) -> Perms:
        topics = self.broker.topics
        if conn.perms_fresh(topic.id, topics.grants_version, self.broker.config.permission_cache_seconds):
            assert conn.perms is not None
            return conn.perms
        perms = await topics.perms_for(conn.user, topic, conn.connected_at)
        conn.perms, conn.perms_topic = perms, topic.id
        conn.perms_loaded, conn.perms_version = time.monotonic(), topics.grants_version
        return perms

    async def _on_connect(self, conn: ConsumerConnection, topic: TopicInfo, history: bool) -> None:
        broker = self.broker
        if topic.is_response:
            await self._clear_gc(topic)
        perms = await self._perms(conn, topic)
        if not perms.consume:
            return
        if topic.policy is not StorePolicy.DISABLED:
            # Acknowledgements still in this process's writer queue (a backend that acked and
            # reconnected at once) are applied before the redelivery reads, or acked messages
            # come again. (The writer never waits on this socket meanwhile: see ``enqueue``.)
            await broker.flush()
        sent = 0
        async for _pk, text in self._outstanding(topic, conn.user, history, conn.connected_at):
            message_id = json.loads(text).get("messageId", "")
            conn.replayed.add(message_id)
            await conn.websocket.send_text(text)
            sent += 1
        if sent:
            broker.touch_ping(topic.id)
            broker.stats["redelivered"] += sent
            metrics.BROKER_DELIVERED.inc(sent)
        elif topic.supports_dasf and not topic.is_response:
            await conn.websocket.send_text(env.broker_request("api_info", broker.clock.now()))

    async def _outstanding(
        self, topic: TopicInfo, user: Identity, history: bool, connected_at: dt.datetime
    ) -> AsyncIterator[tuple[int, str]]:
        """Stored messages the identity still has to get, in table order, in chunks."""
        if topic.policy is StorePolicy.DISABLED:
            return
        key = user.key
        after = 0
        if topic.policy is StorePolicy.STORE:
            after = await self._subscription_start(topic, key, history, connected_at)
        while True:
            async with self.broker.sessionmaker() as session:
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
        async with self.broker.sessionmaker() as session:
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

    async def _sender(self, conn: ConsumerConnection) -> None:
        """Drain the socket's queue (what arrived during the redelivery first)."""
        conn.start()
        while True:
            await self._send_one(conn, await conn.queue.get())

    async def _send_one(self, conn: ConsumerConnection, item: Delivery | PingRequest) -> None:
        """Permission from the socket's cache, then send."""
        broker = self.broker
        websocket = conn.websocket
        if isinstance(item, PingRequest):
            topic = await broker.topics.get(conn.slug)
            if topic is None or not (await self._perms(conn, topic)).consume:
                return
            broker.touch_ping(topic.id)
            await websocket.send_text(env.broker_request(item.message_type, broker.clock.now()))
            return
        if conn.replayed and item.message_id in conn.replayed:
            conn.replayed.discard(item.message_id)
            return
        topic = await broker.topics.get(conn.slug)
        if topic is None or topic.id != item.topic_id:
            topic = await broker.topics.get_by_id(item.topic_id)
            if topic is None:
                return
        if not (await self._perms(conn, topic)).consume:
            return
        await websocket.send_text(item.text)
        broker.stats["delivered"] += 1
        metrics.BROKER_DELIVERED.inc()
        broker.touch_ping(topic.id)

    async def _frame(self, conn: ConsumerConnection, raw: str | bytes) -> dict[str, Any] | None:
        """A consumer's upstream frame: an ack ``{"messageId"}``; any frame counts as a pong."""
        broker = self.broker
        topic = await broker.topics.get(conn.slug)
        if topic is not None:
            broker.touch_pong(topic.id)
        try:
            content = env.parse_json_object(raw, broker.config.max_message_bytes)
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
        if not (await self._perms(conn, topic)).consume:
            return None  # acks from sockets that may not consume are ignored
        await broker.writer.submit(AckOp(topic, message_uuid, conn.user.key))
        return None

    async def _on_left(self, slug: str, left: int) -> None:
        broker = self.broker
        topic = await broker.topics.get(slug)
        if topic is None:
            return  # a consumer waited on a response topic that never came (reference bug 7)
        if topic.is_response:
            if left == 0 and await self._collectable(topic):
                await self._set_gc(
                    topic, broker.clock.now() + dt.timedelta(seconds=broker.config.gc_delay_seconds)
                )
            return
        await broker.ping_topic(topic)

    async def _collectable(self, topic: TopicInfo) -> bool:
        if topic.policy is StorePolicy.DISABLED:
            return True
        if topic.policy is not StorePolicy.CACHE:
            return False
        await self.broker.flush()
        async with self.broker.sessionmaker() as session:
            pending = (
                await session.execute(
                    select(func.count())
                    .select_from(MESSAGES)
                    .where(MESSAGES.c.topic_id == topic.id, MESSAGES.c.transient.is_(False))
                )
            ).scalar()
        return not pending

    async def _set_gc(self, topic: TopicInfo, when: dt.datetime) -> None:
        async with self.broker.sessionmaker() as session:
            await session.execute(
                update(TOPICS).where(TOPICS.c.id == topic.id).values(garbage_collect_on=when)
            )
            await session.commit()

    async def _clear_gc(self, topic: TopicInfo) -> None:
        async with self.broker.sessionmaker() as session:
            await session.execute(
                update(TOPICS)
                .where(TOPICS.c.id == topic.id, TOPICS.c.garbage_collect_on.is_not(None))
                .values(garbage_collect_on=None)
            )
            await session.commit()


__all__ = ["ConsumerProtocol"]
