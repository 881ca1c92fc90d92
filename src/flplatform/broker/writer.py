"""The broker's batched writer: one task per process owns every hot-path write.

Producers, consumers and the broker front ``submit`` operations (``InsertOp`` a message row,
``AckOp`` a consumer acknowledgement, ``NotifyOp`` a bus event, ``FlushOp`` a barrier). The task
drains its queue and writes everything waiting in a single short transaction (inserts, acks,
``last_ping``/``last_pong``, PostgreSQL NOTIFYs in queue order), then resolves the producers'
acks and fans the stored messages out in order. One bad row (a repeated messageId, a topic
deleted meanwhile) is retried alone so it does not fail the batch.

``last_ping``/``last_pong`` are only noted in memory (``touch_ping``/``touch_pong``) and written
behind, at most every ``touch_flush_seconds`` or on ``flush``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, event, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from flplatform.broker import envelope as env
from flplatform.broker.bus import fits_notify, message_event
from flplatform.broker.connections import Delivery
from flplatform.broker.permissions import TopicInfo
from flplatform.broker.tables import DELIVERIES, MESSAGES, TOPICS
from flplatform.broker.topics import consumer_keys
from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm.broker import StorePolicy

if TYPE_CHECKING:
    from flplatform.broker.core import Broker

log = logging.getLogger(__name__)


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


Op = InsertOp | AckOp | NotifyOp | FlushOp


class Writer:
    def __init__(self, broker: Broker, database_url: str):
        self.broker = broker
        config = broker.config
        # The writer's transactions; on SQLite its own connection (see ``_sqlite_writer``).
        self._engine: AsyncEngine | None = None
        self.sessionmaker = broker.sessionmaker
        if not broker.is_postgres and ":memory:" not in database_url and config.sqlite_synchronous != "FULL":
            self._engine = _sqlite_writer(database_url, config.sqlite_synchronous)
            self.sessionmaker = create_sessionmaker(self._engine)
        # None only wakes the task (the touch flusher), so pending touches get written.
        self._queue: asyncio.Queue[Op | None] = asyncio.Queue(maxsize=20 * config.write_batch_size)
        self._pings: dict[uuid.UUID, dt.datetime] = {}
        self._pongs: dict[uuid.UUID, dt.datetime] = {}
        self._touches_written = 0.0

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()

    # ------------------------------------------------------------------ API

    async def submit(self, op: Op) -> None:
        await self._queue.put(op)

    async def flush(self) -> None:
        """Write everything queued so far (last_ping/last_pong included) and wait for it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.submit(FlushOp(future))
        await future

    def touch_ping(self, topic_id: uuid.UUID) -> None:
        self._pings[topic_id] = self.broker.clock.now()

    def touch_pong(self, topic_id: uuid.UUID) -> None:
        self._pongs[topic_id] = self.broker.clock.now()

    # ------------------------------------------------------------------ tasks

    async def touch_flusher(self) -> None:
        while True:
            await asyncio.sleep(self.broker.config.touch_flush_seconds)
            if self._pings or self._pongs:
                try:
                    self._queue.put_nowait(None)  # wakes the writer, which writes the touches
                except asyncio.QueueFull:
                    pass

    async def run(self) -> None:
        limit = self.broker.config.write_batch_size
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < limit:
                try:
                    batch.append(self._queue.get_nowait())
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

    # ------------------------------------------------------------------ one batch

    async def _write(self, ops: list[Op]) -> None:
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
        if flushes or time.monotonic() - self._touches_written >= self.broker.config.touch_flush_seconds:
            pings, self._pings = self._pings, {}
            pongs, self._pongs = self._pongs, {}
            self._touches_written = time.monotonic()
        if not (stream or acks or pings or pongs):
            _resolve(flushes)
            return
        try:
            pks = await self._transaction(stream, acks, pings, pongs)
        except IntegrityError:
            # One bad row (a repeated messageId, a topic deleted meanwhile) must not fail the
            # others: write them one by one, in order, and refuse only the culprit.
            pks = []
            for op in stream:
                try:
                    pks.extend(await self._transaction([op], [], {}, {}))
                except IntegrityError:
                    if isinstance(op, InsertOp):
                        pks.append(None)
            for ack in acks:
                try:
                    await self._transaction([], [ack], {}, {})
                except IntegrityError:
                    log.info("acknowledgement for %s dropped (message gone)", ack.message_uuid)
            await self._transaction([], [], pings, pongs)
        delivered: list[tuple[InsertOp, int]] = []
        for op, pk in zip(inserts, pks, strict=True):
            if op.future is not None and not op.future.done():
                if pk is None:
                    op.future.set_exception(env.EnvelopeError("error: messageId already used on this topic"))
                else:
                    op.future.set_result(pk)
            if pk is not None and not op.transient:
                delivered.append((op, pk))
        _resolve(flushes)
        for op, _pk in delivered:
            await self.broker.fanout.dispatch(
                op.topic, Delivery(op.topic.id, op.produced.message_id, op.produced.text)
            )

    async def _transaction(
        self,
        stream: list[InsertOp | NotifyOp],
        acks: list[AckOp],
        pings: dict[uuid.UUID, dt.datetime],
        pongs: dict[uuid.UUID, dt.datetime],
    ) -> list[int | None]:
        """One transaction: insert the stream's rows, apply acks and touches, queue the stream's
        NOTIFYs in stream order (PostgreSQL); returns the inserted primary keys in order."""
        broker = self.broker
        inserts = [op for op in stream if isinstance(op, InsertOp)]
        pks: list[int | None] = []
        notifies: list[dict[str, Any]] = []
        async with self.sessionmaker() as session:
            if inserts:
                now = broker.clock.now()
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
            if broker.bus.cross_process:
                pk_of: dict[int, int | None] = {id(op): pk for op, pk in zip(inserts, pks, strict=True)}
                pk_of.update(await self._relay_copies(session, inserts))
                inline = broker.config.notify_inline_bytes
                for op in stream:
                    if isinstance(op, InsertOp):
                        notifies.append(
                            message_event(op.topic.slug, op.topic.id, op.produced.text, pk_of[id(op)], inline)
                        )
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
                await broker.bus.send(session, notifies)
            await session.commit()
        broker.stats["write_batches"] += 1
        return pks

    async def _relay_copies(self, session: AsyncSession, inserts: list[InsertOp]) -> dict[int, int]:
        """PostgreSQL, ``cache`` bodies too large to inline in a NOTIFY: the first ack deletes the
        stored row, possibly before another process has read it, so those processes read a
        transient copy instead (swept after a minute). Returns ``id(op)`` → the copy's key."""
        inline = self.broker.config.notify_inline_bytes
        copies = [
            op
            for op in inserts
            if not op.transient
            and op.topic.policy is StorePolicy.CACHE
            and not fits_notify(op.produced.text, op.topic.slug, inline)
        ]
        if not copies:
            return {}
        now = self.broker.clock.now()
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
                    "delivered_at": self.broker.clock.now(),
                }
                for a in items
                if a.message_uuid in pk_of
            ]
            if not rows:
                continue
            dialect: Any = postgresql if self.broker.is_postgres else sqlite
            await session.execute(dialect.insert(DELIVERIES).on_conflict_do_nothing(), rows)
            if topic.policy is StorePolicy.CACHEALL:
                await _delete_delivered_to_all(session, topic, list(pk_of.values()))


def _resolve(flushes: list[FlushOp]) -> None:
    for op in flushes:
        if not op.future.done():
            op.future.set_result(None)


async def _delete_delivered_to_all(session: AsyncSession, topic: TopicInfo, pks: list[int]) -> None:
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


def _sqlite_writer(database_url: str, synchronous: str) -> AsyncEngine:
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


__all__ = ["AckOp", "FlushOp", "InsertOp", "NotifyOp", "Op", "Writer"]
