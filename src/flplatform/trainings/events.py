"""Training events: what happened to a training, as it happens (round started, update received,
aggregation started/finished, test metrics received, state changes, errors), for the live
stream ``GET /api/trainings/{id}/events/`` (:mod:`flplatform.trainings.event_stream`).

**Recorded in the transaction of the change.** The domain calls :func:`record` where the state
changes (``phases``, ``runtime``, ``contributions``, ``service``), in that change's transaction:
the event row is committed with the change or rolled back with it, so no subscriber ever sees
an event for a change that did not happen. Subscribers are woken only after the commit: in
this process by a SQLAlchemy ``after_commit`` listener (:func:`install`), in the other
processes by a PostgreSQL ``NOTIFY`` on ``flp_training_events`` queued in the same transaction
(delivered at commit, never for a rollback; :mod:`flplatform.kit.bus` listens).

**Numbered per training, in commit order.** :func:`record` bumps the training's counter row
(``training_event_heads``, an upsert that keeps the row locked until the commit), so of two
transactions recording events of one training the second takes its number only after the first
committed: a subscriber that has read up to number n can never later find an event numbered
below n. (A global sequence would not give this: numbers are taken at insert, commits land in
any order.) Call it after the transaction has taken the training's own row lock, as every
caller does, so the lock order is always training row, then counter row.

**A bounded history.** Only the newest ``FLP_TRAINING_EVENTS_KEEP`` events per training are
kept (pruned periodically by :func:`prune`): enough to replay what a reconnecting subscriber
missed (``Last-Event-ID``), to draw a dashboard's timeline of recent rounds and to let a
subscriber on another worker process read what it was only told about by ``NOTIFY`` (a NOTIFY
payload is small and lost for a process that was not listening). The durable record of a
training stays where it was: the model history, metrics and the audit log.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import uuid
from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, delete, event, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from flplatform.orm import TrainingEvent, TrainingEventHead
from flplatform.orm.base import utcnow

log = logging.getLogger(__name__)

CHANNEL = "flp_training_events"
ORIGIN = uuid.uuid4().hex[:12]  # this process, in its NOTIFY payloads (its own are skipped)

# Event kinds (the SSE ``event:`` field).
ROUND_STARTED = "round_started"
UPDATE_RECEIVED = "update_received"
SWAG_STATISTICS_RECEIVED = "swag_statistics_received"
AGGREGATION_STARTED = "aggregation_started"
AGGREGATION_FINISHED = "aggregation_finished"
TEST_ROUND_STARTED = "test_round_started"
TEST_METRICS_RECEIVED = "test_metrics_received"
STATE_CHANGED = "state_changed"
PARTICIPANT_REMOVED = "participant_removed"
PARTICIPANT_DROPPED = "participant_dropped"
ERROR = "error"
GAP = "gap"  # stream only: events the subscriber missed were pruned (never stored)

KINDS = (
    ROUND_STARTED,
    UPDATE_RECEIVED,
    SWAG_STATISTICS_RECEIVED,
    AGGREGATION_STARTED,
    AGGREGATION_FINISHED,
    TEST_ROUND_STARTED,
    TEST_METRICS_RECEIVED,
    STATE_CHANGED,
    PARTICIPANT_REMOVED,
    PARTICIPANT_DROPPED,
    ERROR,
    GAP,
)

MAX_METRICS = 100  # metrics carried by one event (the rest: GET /api/models/{id}/metrics/)
_PENDING = "flp_training_events_pending"


@functools.cache
def _statements(dialect: str) -> tuple[Any, Any]:
    """(the counter row's bump, the event's insert) for ``dialect``, built once per process (building
    them cost more CPU than running them); the values are bound parameters. On PostgreSQL the insert
    holds the bump (a data-modifying CTE: its row lock is taken as before) and the NOTIFY rides on
    it: one statement, one round trip per event."""
    # Tables, not the mapped classes: with parameters, an ORM insert would be an ORM bulk insert.
    heads, events = cast(Table, TrainingEventHead.__table__), cast(Table, TrainingEvent.__table__)
    training_id = bindparam("training_id", type_=heads.c.training_id.type)
    upsert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    bump = (
        upsert(heads)
        .values(training_id=training_id, last_seq=1)
        .on_conflict_do_update(
            index_elements=[heads.c.training_id],
            set_={"last_seq": heads.c.last_seq + 1},
        )
        .returning(heads.c.last_seq)
    )
    kind = bindparam("kind", type_=events.c.kind.type)
    data = bindparam("data", type_=events.c.data.type)
    created_at = bindparam("created_at", type_=events.c.created_at.type)
    if dialect != "postgresql":
        seq = bindparam("seq", type_=events.c.seq.type)
        values = {
            "training_id": training_id,
            "seq": seq,
            "kind": kind,
            "data": data,
            "created_at": created_at,
        }
        return bump, insert(events).values(values)
    head = bump.cte("head")
    numbered = (
        insert(events)
        .from_select(
            ["training_id", "seq", "kind", "data", "created_at"],
            select(training_id, head.c.last_seq, kind, data, created_at),
        )
        .returning(events.c.seq, func.pg_notify(CHANNEL, bindparam("note", type_=String)))
    )
    return bump, numbered


async def _next_seq(session: AsyncSession, training_id: uuid.UUID) -> int:
    """The training's next event number; the counter row stays locked until the commit."""
    bump, _ = _statements(session.get_bind().dialect.name)
    return int((await session.execute(bump, {"training_id": training_id})).scalar_one())


async def record(
    session: AsyncSession, training_id: uuid.UUID, kind: str, data: Mapping[str, Any] | None = None
) -> int:
    """Record an event of the training in the session's transaction; returns its number.
    Subscribers see it once (and only if) the transaction commits."""
    payload = json.loads(json.dumps(dict(data or {}), default=str))  # UUIDs, datetimes → strings
    params: dict[str, Any] = {
        "training_id": training_id,
        "kind": kind,
        "data": payload,
        "created_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    _, numbered = _statements(dialect)
    if dialect == "postgresql":
        params["note"] = json.dumps({"o": ORIGIN, "t": str(training_id)}, separators=(",", ":"))
        seq = int((await session.execute(numbered, params)).one()[0])
    else:
        seq = params["seq"] = await _next_seq(session, training_id)
        await session.execute(numbered, params)
    session.info.setdefault(_PENDING, set()).add(training_id)
    return seq


def metrics_payload(metrics: list[tuple[str, float | None, bytes | None]]) -> dict[str, Any]:
    """``{"metrics": {name: value}}`` of the numeric metrics (at most :data:`MAX_METRICS`); a NaN or
    infinite value is ``null`` (JSON, and PostgreSQL's json column, have no NaN)."""
    values = {
        name: value if math.isfinite(value) else None for name, value, _ in metrics if value is not None
    }
    out: dict[str, Any] = {"metrics": dict(list(values.items())[:MAX_METRICS])}
    if len(values) > MAX_METRICS:
        out["metrics_truncated"] = True
    return out


async def prune(session: AsyncSession, keep: int) -> int:
    """Delete all but the newest ``keep`` events of every training; returns the rows deleted."""
    newest = (
        select(TrainingEventHead.last_seq)
        .where(TrainingEventHead.training_id == TrainingEvent.training_id)
        .scalar_subquery()
    )
    result = await session.execute(
        delete(TrainingEvent)
        .where(TrainingEvent.seq <= newest - keep)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


# --------------------------------------------------------------------------- waking subscribers


class _Waiter:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # its loop is closed: the subscriber is gone
            pass


class Hub:
    """This process's subscribers, by training: woken after a commit that recorded events of
    their training (here, or in another process through NOTIFY). A wake only says "look
    again": subscribers read the events from the database."""

    def __init__(self) -> None:
        self._waiters: dict[uuid.UUID, set[_Waiter]] = {}

    def subscribe(self, training_id: uuid.UUID) -> _Waiter:
        waiter = _Waiter()
        self._waiters.setdefault(training_id, set()).add(waiter)
        return waiter

    def unsubscribe(self, training_id: uuid.UUID, waiter: _Waiter) -> None:
        waiters = self._waiters.get(training_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[training_id]

    def wake(self, training_id: uuid.UUID) -> None:
        for waiter in list(self._waiters.get(training_id, ())):
            waiter.wake()

    def subscribers(self, training_id: uuid.UUID | None = None) -> int:
        if training_id is not None:
            return len(self._waiters.get(training_id, ()))
        return sum(len(w) for w in self._waiters.values())


HUB = Hub()


def _after_commit(session: Session) -> None:
    for training_id in session.info.pop(_PENDING, ()):
        HUB.wake(training_id)


def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)


def install() -> None:
    """Wake this process's subscribers after every commit that recorded events (called by
    :func:`flplatform.jobs.install`, like every other cross-cutting hook)."""
    if not event.contains(Session, "after_commit", _after_commit):
        event.listen(Session, "after_commit", _after_commit)
        event.listen(Session, "after_rollback", _after_rollback)
