"""Reading the training events (:mod:`flplatform.trainings.events`) as a live stream, and the
lifespan component that carries the wake-ups between processes and prunes the history.

A subscriber (one ``GET /api/trainings/{id}/events/``) replays the recorded events after the
number it last saw (``Last-Event-ID``), then waits: woken after each commit that recorded events
of its training, it reads the new ones from the database, in number order. Events are read
from the table, never carried in the wake-up, so a subscriber on any worker process gets the
same events in the same order, and a wake-up that was lost (a listener reconnecting, a
``flplatform worker`` on SQLite, which has no NOTIFY) only delays them until the next poll
(``FLP_TRAINING_EVENTS_POLL_SECONDS``). Each read is its own short session: a subscriber holds
no database connection while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.kit.bus import InProcessBus, PostgresBus
from flplatform.orm import Training, TrainingEvent, TrainingEventHead
from flplatform.settings import Settings
from flplatform.trainings import events
from flplatform.trainings.schemas import TrainingEventRead

log = logging.getLogger(__name__)

BATCH = 200  # events read per query while catching up


class StopSignal(Protocol):
    """An ``asyncio.Event`` or ``anyio.Event``: set when the stream should end (server shutdown)."""

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


async def _wait(wake: asyncio.Event, stop: StopSignal | None, timeout: float) -> None:
    """Until woken, stopped or ``timeout`` seconds passed."""
    if stop is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)
        return
    tasks = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _read(training_id: uuid.UUID, row: TrainingEvent) -> TrainingEventRead:
    return TrainingEventRead(
        seq=row.seq, kind=row.kind, training_id=training_id, at=row.created_at, data=row.data or {}
    )


async def _start(
    session: AsyncSession, training_id: uuid.UUID, after: int
) -> tuple[int, TrainingEventRead | None]:
    """Where a subscriber that last saw ``after`` starts, and a ``gap`` event when events it
    missed were pruned. A number above the newest (a database restored from a backup) starts
    over from the beginning."""
    head = (
        await session.execute(
            select(TrainingEventHead.last_seq).where(TrainingEventHead.training_id == training_id)
        )
    ).scalar_one_or_none() or 0
    if after > head:
        after = 0
    oldest = (
        await session.execute(
            select(func.min(TrainingEvent.seq)).where(TrainingEvent.training_id == training_id)
        )
    ).scalar_one_or_none()
    if oldest is not None and oldest > after + 1:
        gap = TrainingEventRead(
            seq=None,
            kind=events.GAP,
            training_id=training_id,
            at=None,
            data={"missed_from": after + 1, "missed_to": oldest - 1},
        )
        return after, gap
    return after, None


async def stream(
    sessionmaker: async_sessionmaker[AsyncSession],
    training_id: uuid.UUID,
    *,
    after: int = 0,
    poll_seconds: float = 5.0,
    stop: StopSignal | None = None,
) -> AsyncIterator[TrainingEventRead]:
    """The training's events numbered above ``after``, then each new one as it is committed;
    ends when the training is deleted or ``stop`` is set (the caller's permission was checked
    before)."""
    waiter = events.HUB.subscribe(training_id)
    try:
        async with sessionmaker() as session:
            after, gap = await _start(session, training_id, after)
        if gap is not None:
            yield gap
        while stop is None or not stop.is_set():
            waiter.event.clear()  # before reading: a commit during the read wakes the next wait
            async with sessionmaker() as session:
                rows = (
                    (
                        await session.execute(
                            select(TrainingEvent)
                            .where(TrainingEvent.training_id == training_id, TrainingEvent.seq > after)
                            .order_by(TrainingEvent.seq)
                            .limit(BATCH)
                        )
                    )
                    .scalars()
                    .all()
                )
                exists = bool(rows) or (await session.get(Training, training_id)) is not None
            for row in rows:
                after = row.seq
                yield _read(training_id, row)
            if len(rows) == BATCH:
                continue
            if not exists:
                return
            await _wait(waiter.event, stop, poll_seconds)
    finally:
        events.HUB.unsubscribe(training_id, waiter)


async def _prune_loop(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.training_events_prune_interval_seconds)
        try:
            async with sessionmaker() as session:
                deleted = await events.prune(session, settings.training_events_keep)
                await session.commit()
            if deleted:
                log.debug("pruned %d training events", deleted)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pruning the training events failed")


@contextlib.asynccontextmanager
async def training_events_component(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan component: on PostgreSQL, listen on ``flp_training_events`` and wake this
    process's subscribers of the trainings other processes recorded events for; everywhere,
    prune the history every ``FLP_TRAINING_EVENTS_PRUNE_INTERVAL_SECONDS``."""
    settings: Settings = app.state.settings
    bus: InProcessBus | PostgresBus
    if settings.database_url.startswith("postgresql"):
        bus = PostgresBus(settings.database_url, events.CHANNEL)
        bus.origin = events.ORIGIN  # this process's subscribers were woken after its own commits
    else:
        bus = InProcessBus(events.CHANNEL)

    async def on_event(note: dict[str, Any]) -> None:
        events.HUB.wake(uuid.UUID(str(note["t"])))

    await bus.start(on_event)
    pruner = asyncio.get_running_loop().create_task(
        _prune_loop(app.state.sessionmaker, settings), name="training-events-prune"
    )
    try:
        yield
    finally:
        pruner.cancel()
        await asyncio.gather(pruner, return_exceptions=True)
        await bus.stop()
