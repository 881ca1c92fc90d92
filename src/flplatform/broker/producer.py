"""The producer protocol: a socket that publishes envelopes to one topic.

Every frame gets exactly one ack, in order. A frame is parsed and validated
(``envelope.validate_produced``), the topic and the producer's permission come from the caches
(``topics``, the per-socket grant cache), a response topic named by the envelope is created on
first use; then the message is handed to the writer (storing policies: the ack waits for the
row) or fanned out at once (``disabled``; on PostgreSQL announced to the other processes
through the writer). Up to ``producer_max_inflight`` acks may wait for the writer at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError
from starlette.websockets import WebSocket, WebSocketState

from flplatform.broker import envelope as env
from flplatform.broker.bus import fits_notify, message_event
from flplatform.broker.connections import Delivery, receive_frame
from flplatform.broker.permissions import Identity, Perms, TopicInfo
from flplatform.broker.writer import InsertOp, NotifyOp
from flplatform.kit import metrics
from flplatform.orm.broker import BrokerTopic, BrokerTopicGrant, ResponseTopic, StorePolicy

if TYPE_CHECKING:
    from flplatform.broker.core import Broker

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """A producer frame waiting for the writer; its ack is sent when ``future`` resolves."""

    future: asyncio.Future[int]
    produced: env.Produced


@dataclass
class _ProducerState:
    user: Identity
    perms: dict[uuid.UUID, tuple[Perms, float, int]] = field(default_factory=dict)


class ProducerProtocol:
    def __init__(self, broker: Broker):
        self.broker = broker

    async def session(self, websocket: WebSocket, slug: str, user: Identity) -> None:
        """Serve a producer socket: every frame gets exactly one ack, in order."""
        state = _ProducerState(user)
        acks: asyncio.Queue[dict[str, Any] | _Pending | None] = asyncio.Queue(
            maxsize=self.broker.config.producer_max_inflight
        )
        sender = asyncio.get_running_loop().create_task(self._send_acks(websocket, acks))
        metrics.BROKER_PRODUCERS.inc()
        try:
            while True:
                raw = await receive_frame(websocket)
                if raw is None:  # disconnected
                    break
                item: dict[str, Any] | _Pending
                try:
                    item = await self._produce(state, slug, raw)
                except Exception:  # never kill the socket on one frame
                    log.exception("publishing to %s failed", slug)
                    item = env.error_ack("error: internal error while publishing")
                await acks.put(item)
                if sender.done():
                    break
        finally:
            metrics.BROKER_PRODUCERS.dec()
            await acks.put(None)
            try:
                await asyncio.wait_for(sender, 30)
            except (TimeoutError, Exception):
                sender.cancel()

    async def _send_acks(
        self, websocket: WebSocket, acks: asyncio.Queue[dict[str, Any] | _Pending | None]
    ) -> None:
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

    async def _perms(self, state: _ProducerState, topic: TopicInfo) -> Perms:
        topics = self.broker.topics
        cached = state.perms.get(topic.id)
        now = time.monotonic()
        if (
            cached is not None
            and cached[2] == topics.grants_version
            and now - cached[1] < self.broker.config.permission_cache_seconds
        ):
            return cached[0]
        perms = await topics.perms_for(state.user, topic)
        state.perms[topic.id] = (perms, now, topics.grants_version)
        return perms

    async def _produce(self, state: _ProducerState, slug: str, raw: str | bytes) -> dict[str, Any] | _Pending:
        broker = self.broker
        try:
            content = env.parse_json_object(raw, broker.config.max_message_bytes)
        except env.EnvelopeError as exc:
            metrics.BROKER_REFUSED.inc()
            return env.error_ack(str(exc))
        has_context, context = "context" in content, content.get("context")
        supplied_id = content.get("messageId")

        def refuse(reason: str) -> dict[str, Any]:
            metrics.BROKER_REFUSED.inc()
            return env.error_ack(reason, supplied_id, context, has_context)

        try:
            produced = env.validate_produced(content, broker.clock.now())
        except env.EnvelopeError as exc:
            return refuse(str(exc))
        topic = await broker.topics.get(slug)
        if topic is None:
            if not broker.config.create_topic_on_message:
                return refuse(f"error: Topic {slug} does not exist.")
            if state.user.is_anonymous:
                return refuse("error: user is not allowed to create topics.")
            topic = await self._create_topic_on_message(slug, state.user)
            if topic is None:
                return refuse(f"error: Topic {slug} could not be created.")
        perms = await self._perms(state, topic)
        if not perms.produce:
            return refuse("error: user is not allowed to publish to this topic")
        if produced.response_topic is not None and produced.response_topic != slug:
            problem = await self._ensure_response_topic(produced.response_topic, topic, state.user)
            if problem is not None:
                return refuse(problem)
        produced.text = json.dumps(produced.content)
        broker.stats["published"] += 1
        metrics.BROKER_PUBLISHED.inc()
        if topic.policy is StorePolicy.DISABLED:
            if broker.bus.cross_process:
                await self._announce_unstored(topic, produced, state.user)
            await broker.fanout.dispatch(topic, Delivery(topic.id, produced.message_id, produced.text))
            return env.ok_ack(produced.message_id, produced.context, produced.has_context)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await broker.writer.submit(InsertOp(topic, produced, state.user.id, future))
        return _Pending(future, produced)

    async def _create_topic_on_message(self, slug: str, user: Identity) -> TopicInfo | None:
        broker = self.broker
        async with broker.sessionmaker() as session:
            row = BrokerTopic(slug=slug, owner_id=user.id, created_at=broker.clock.now())
            session.add(row)
            try:
                await session.flush()
                session.add(
                    BrokerTopicGrant(topic_id=row.id, user_id=user.id, can_produce=True, can_consume=True)
                )
                await session.commit()
            except IntegrityError:
                await session.rollback()
        await broker.invalidate(slug)
        return await broker.topics.get(slug, fresh=True)

    async def _ensure_response_topic(self, slug: str, source: TopicInfo, user: Identity) -> str | None:
        """Create the response topic on first use; None when fine, else the refusal text."""
        broker = self.broker
        topic = await broker.topics.get(slug)
        if topic is None:
            async with broker.sessionmaker() as session:
                session.add(
                    ResponseTopic(
                        slug=slug,
                        is_response_for_id=source.id,
                        requester_id=user.id,
                        is_public=False,
                        supports_dasf=True,
                        created_at=broker.clock.now(),
                    )
                )
                try:
                    await session.commit()
                except IntegrityError:
                    await session.rollback()
            await broker.invalidate(slug)
            topic = await broker.topics.get(slug, fresh=True)
        if topic is None or not topic.is_response or topic.source_id != source.id:
            return f"error: response topic {slug} collides with an existing topic"
        return None

    async def _announce_unstored(self, topic: TopicInfo, produced: env.Produced, user: Identity) -> None:
        """PostgreSQL: tell the other processes about a ``disabled`` message (small bodies inline,
        large ones through a transient row)."""
        writer, inline = self.broker.writer, self.broker.config.notify_inline_bytes
        if fits_notify(produced.text, topic.slug, inline):
            await writer.submit(NotifyOp(message_event(topic.slug, topic.id, produced.text, None, inline)))
        else:
            await writer.submit(InsertOp(topic, produced, user.id, None, transient=True))


__all__ = ["ProducerProtocol"]
