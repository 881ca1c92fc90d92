"""Availability and upkeep: the status-ping socket (backends' pongs and ``api_info`` replies),
pings (one topic, or every DASF source topic from the ping timer), and the GC sweeper that
deletes response topics whose time has come and old transient rows.

Availability itself is ``last_ping`` versus ``last_pong`` (see ``availability``); pings and pongs
are noted in memory and written behind by the writer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from starlette.websockets import WebSocket

from flplatform.broker import envelope as env
from flplatform.broker.connections import PingRequest, receive_frame
from flplatform.broker.permissions import Identity, TopicInfo
from flplatform.broker.tables import MESSAGES, TOPICS
from flplatform.broker.writer import NotifyOp

if TYPE_CHECKING:
    from flplatform.broker.core import Broker

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(self, broker: Broker):
        self.broker = broker

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
        broker = self.broker
        try:
            content = env.parse_json_object(raw, broker.config.max_message_bytes)
        except env.EnvelopeError as exc:
            return env.error_ack(str(exc))
        has_context, context = "context" in content, content.get("context")
        try:
            produced = env.validate_produced(content, broker.clock.now())
        except env.EnvelopeError as exc:
            return env.error_ack(str(exc), content.get("messageId"), context, has_context)

        def refuse(reason: str) -> dict[str, Any]:
            return env.error_ack(reason, produced.message_id, context, has_context)

        properties = content.get("properties") or {}
        source = properties.get("source_topic")
        topic = await broker.topics.get(source) if isinstance(source, str) else None
        if topic is None:
            return refuse("error: No source topic found.")
        if not (await broker.topics.perms_for(user, topic)).consume:
            return refuse("error: user is not allowed to answer for this topic")
        if properties.get("messageType") == "pong":
            broker.touch_pong(topic.id)
        if "api_info" in properties:
            api_info = properties["api_info"]
            if isinstance(api_info, str):
                try:
                    api_info = json.loads(api_info)
                except ValueError:
                    return refuse("properties.api_info is not valid JSON")
            if not isinstance(api_info, dict):
                return refuse("properties.api_info must be a JSON object")
            async with broker.sessionmaker() as session:
                await session.execute(update(TOPICS).where(TOPICS.c.id == topic.id).values(api_info=api_info))
                await session.commit()
            broker.touch_pong(topic.id)
        return env.ok_ack(produced.message_id, context, has_context)

    # ------------------------------------------------------------------ pings

    async def ping_topic(self, topic: TopicInfo) -> None:
        """Set last_ping and send each consumer socket (in every process) a ping envelope."""
        if not topic.supports_dasf or topic.is_response:
            return
        broker = self.broker
        broker.touch_ping(topic.id)
        self.ping_local(topic)
        if broker.bus.cross_process:
            await broker.writer.submit(NotifyOp({"k": "g", "s": topic.slug}))

    def ping_local(self, topic: TopicInfo) -> None:
        for conn in self.broker.registry.consumers(topic.slug):
            try:
                conn.queue.put_nowait(PingRequest("ping"))
            except asyncio.QueueFull:
                pass  # a busy consumer: its deliveries count as pings anyway

    async def ping_all(self) -> int:
        """The timer's job: every DASF source topic gets last_ping=now, and local sockets a ping."""
        broker = self.broker
        now = broker.clock.now()
        async with broker.sessionmaker() as session:
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
            if broker.registry.has_consumers(slug):
                topic = await broker.topics.get(slug)
                if topic is not None:
                    self.ping_local(topic)
        return len(rows)

    async def ping_timer(self) -> None:
        while True:
            await asyncio.sleep(self.broker.config.ping_interval_seconds)
            try:
                await self.ping_all()
            except Exception:
                log.exception("broker ping timer failed")

    # ------------------------------------------------------------------ garbage collection

    async def sweep(self) -> list[str]:
        """Delete response topics whose GC time has come (unless a consumer is back) and old
        transient rows; returns the deleted slugs."""
        broker = self.broker
        now = broker.clock.now()
        async with broker.sessionmaker() as session:
            # Sockets of this process keep their response topics alive (other processes do the same).
            local = [s for s in broker.registry.slugs() if broker.registry.has_consumers(s)]
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
            await broker.invalidate(row.slug)
        return [row.slug for row in due]

    async def gc_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.broker.config.gc_interval_seconds)
            try:
                await self.sweep()
            except Exception:
                log.exception("broker GC sweeper failed")


__all__ = ["Maintenance"]
