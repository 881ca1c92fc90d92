"""Client liveness (NVFLARE-style heartbeats): when each participant was last heard from.

A client is heard from over HTTP (``POST /api/trainings/{id}/heartbeat/``, one row per user in
``client_heartbeats``) or, when it is a broker backend, through the broker's own ping/pong: the
newest ``last_pong`` of a source topic the user owns counts as a heartbeat (the broker writes it;
nothing here adds to the broker's path). A participant is

* ``online`` when last heard from within ``FLP_CLIENT_OFFLINE_AFTER_SECONDS``,
* ``offline`` when heard from before that,
* ``unknown`` when never heard from (clients that send no heartbeats, e.g. the DLR clients):
  unknown clients are never dropped.

A selected client offline for longer than ``FLP_CLIENT_DROP_AFTER_SECONDS`` is dropped from its
round by the training sweep (``sweeper.drop_offline``), the way a client whose notification was
rejected is taken out; it stays a participant and may be selected again.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from sqlalchemy import exists, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import Forbidden
from flplatform.orm import BrokerTopic, ClientHeartbeat, Model, RoundSelection, Training
from flplatform.orm.base import utcnow
from flplatform.orm.training import ACTIVE_STATES, training_participants
from flplatform.permissions import Requester, ensure_visible
from flplatform.settings import Settings, get_settings
from flplatform.trainings.repository import get_training
from flplatform.trainings.schemas import HeartbeatRead

ONLINE, OFFLINE, UNKNOWN = "online", "offline", "unknown"
_CHUNK = 1000  # ids per IN list (well under SQLite's and asyncpg's parameter limits)


def settings_of(session: AsyncSession) -> Settings:
    """The settings the session's application runs with (``session.info["settings"]`` when the
    application put them there), else the process's ``FLP_*`` settings."""
    found = session.info.get("settings")
    return found if isinstance(found, Settings) else get_settings()


async def beat(session: AsyncSession, user_id: uuid.UUID, now: dt.datetime, source: str = "http") -> None:
    """Record a heartbeat of ``user_id`` (one upsert)."""
    dialect = session.get_bind().dialect.name
    upsert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = upsert(ClientHeartbeat).values(user_id=user_id, last_seen_at=now, source=source)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[ClientHeartbeat.user_id], set_={"last_seen_at": now, "source": source}
        )
    )


async def last_seen(session: AsyncSession, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, dt.datetime]:
    """When each of ``user_ids`` was last heard from (HTTP heartbeat or broker pong); users never
    heard from are absent."""
    ids = list(dict.fromkeys(user_ids))
    seen: dict[uuid.UUID, dt.datetime] = {}

    def keep(user_id: uuid.UUID | None, at: dt.datetime | None) -> None:
        if user_id is not None and at is not None and (user_id not in seen or at > seen[user_id]):
            seen[user_id] = at

    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        for user_id, at in await session.execute(
            select(ClientHeartbeat.user_id, ClientHeartbeat.last_seen_at).where(
                ClientHeartbeat.user_id.in_(chunk)
            )
        ):
            keep(user_id, at)
        for owner_id, pong in await session.execute(
            select(BrokerTopic.owner_id, func.max(BrokerTopic.last_pong))
            .where(
                BrokerTopic.owner_id.in_(chunk),
                BrokerTopic.kind == "topic",
                BrokerTopic.last_pong.is_not(None),
            )
            .group_by(BrokerTopic.owner_id)
        ):
            keep(owner_id, _aware(pong))
    return seen


def _aware(at: dt.datetime | None) -> dt.datetime | None:
    """Broker timestamps are stored without the UTC marker on SQLite."""
    if at is not None and at.tzinfo is None:
        return at.replace(tzinfo=dt.UTC)
    return at


def status(seen: dt.datetime | None, now: dt.datetime, offline_after: float) -> str:
    if seen is None:
        return UNKNOWN
    return ONLINE if (now - seen).total_seconds() <= offline_after else OFFLINE


async def stale(session: AsyncSession, user_ids: Iterable[uuid.UUID], cutoff: dt.datetime) -> set[uuid.UUID]:
    """Those of ``user_ids`` heard from, but not since ``cutoff`` (unknown ones are not stale)."""
    seen = await last_seen(session, user_ids)
    return {user_id for user_id, at in seen.items() if at < cutoff}


async def training_heartbeat(requester: Requester, training_id: uuid.UUID) -> HeartbeatRead:
    """A participant's heartbeat: recorded, and answered with what the training expects of it
    (one read of the training and the caller's own rows; the participant list is not loaded)."""
    session, user = requester.session, requester.authenticated_user
    tp, sel = training_participants.c, RoundSelection.__table__.c
    row = (
        await session.execute(
            select(
                Training.state,
                Training.phase,
                Training.selection_round,
                Model.round,
                exists().where(tp.training_id == Training.id, tp.user_id == user.id),
                exists().where(
                    sel.training_id == Training.id,
                    sel.round == Training.selection_round,
                    sel.user_id == user.id,
                    sel.dropped_at.is_(None),
                ),
            )
            .join(Model, Model.id == Training.model_id)
            .where(Training.id == training_id)
        )
    ).one_or_none()
    if row is None or not row[4]:
        # Not a participant: the same answer as reading the training (404, or 403 if visible).
        training = await get_training(session, training_id)
        await ensure_visible(requester, training, f"Training {training_id}", None)
        raise Forbidden(f"You are not a participant of training {training_id}!", code="not_a_participant")
    state, phase, selection_round, round_, _, selected = row
    now = utcnow()
    await beat(session, user.id, now)
    active = state in ACTIVE_STATES
    return HeartbeatRead(
        training_id=training_id,
        participant=user.id,
        last_seen=now,
        state=state,
        phase=phase,
        round=round_,
        selected=active and (selection_round is None or bool(selected)),
    )
