"""A training's participants, read and written by query (issue 18: flat rounds in big fleets).

``Training.participants`` is never loaded by the round machinery or by the training routes'
permission check: at 5,000 registered clients loading it cost 0.1–0.4 s of ORM objects per load,
and a round transition loaded it several times. Instead:

* membership tests, counts and the few users a step needs are indexed queries on
  ``training_participants`` (the association table's primary key is (training_id, user_id));
* what truly needs every participant (the seeded draw, the notification of every participant at
  the start and the end) reads plain column tuples (:class:`Candidate`), never ORM users;
* participants are added and removed with one ``INSERT``/``DELETE`` on the association table.

Rows returned by the ``candidates`` queries have ``id``, ``username``, ``message_endpoint`` and
``notify_client_removed`` attributes, so the notification outbox and the draw take them as they
take users.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy import delete, exists, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.orm import User
from flplatform.orm.base import utcnow
from flplatform.orm.training import training_participants

TP = training_participants.c


class Candidate(Protocol):
    """What the draw and the outbox read of a participant (a ``User`` or a :func:`candidates` row)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def username(self) -> str: ...
    @property
    def message_endpoint(self) -> str | None: ...


_COLUMNS = (User.id, User.username, User.message_endpoint, User.notify_client_removed)


def _of(training_id: uuid.UUID) -> Any:
    return (
        select(*_COLUMNS)
        .join(training_participants, TP.user_id == User.id)
        .where(TP.training_id == training_id)
    )


async def candidates(session: AsyncSession, training_id: uuid.UUID) -> list[Any]:
    """Every participant as a column tuple (id, username, message_endpoint, notify_client_removed),
    in (username, id) order — Python's order, as the seeded draw has always used."""
    rows = list((await session.execute(_of(training_id))).all())
    rows.sort(key=lambda r: (r.username, r.id))
    return rows


async def some(session: AsyncSession, training_id: uuid.UUID, user_ids: Iterable[uuid.UUID]) -> list[Any]:
    """The participants among ``user_ids`` as column tuples, in (username, id) order."""
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return []
    rows = list((await session.execute(_of(training_id).where(TP.user_id.in_(ids)))).all())
    rows.sort(key=lambda r: (r.username, r.id))
    return rows


async def users(session: AsyncSession, training_id: uuid.UUID, user_ids: Iterable[uuid.UUID]) -> list[User]:
    """The participants among ``user_ids`` as ORM users (for the few a step acts on)."""
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return []
    stmt = (
        select(User)
        .join(training_participants, TP.user_id == User.id)
        .where(TP.training_id == training_id, TP.user_id.in_(ids))
        .order_by(User.username, User.id)
    )
    return list((await session.execute(stmt)).scalars())


async def ids(session: AsyncSession, training_id: uuid.UUID) -> set[uuid.UUID]:
    """Every participant's id (one column)."""
    rows = await session.execute(select(TP.user_id).where(TP.training_id == training_id))
    return set(rows.scalars())


async def ids_of(
    session: AsyncSession, training_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[uuid.UUID]]:
    """Training → its participants' ids, for many trainings in one statement."""
    out: dict[uuid.UUID, list[uuid.UUID]] = {t: [] for t in training_ids}
    if training_ids:
        rows = await session.execute(
            select(TP.training_id, TP.user_id).where(TP.training_id.in_(list(training_ids)))
        )
        for training_id, user_id in rows:
            out[training_id].append(user_id)
    return out


async def present(
    session: AsyncSession, training_id: uuid.UUID, user_ids: Iterable[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of ``user_ids`` are participants."""
    wanted = list(dict.fromkeys(user_ids))
    if not wanted:
        return set()
    rows = await session.execute(
        select(TP.user_id).where(TP.training_id == training_id, TP.user_id.in_(wanted))
    )
    return set(rows.scalars())


async def is_participant(session: AsyncSession, training_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    return bool(
        (
            await session.execute(
                select(exists().where(TP.training_id == training_id, TP.user_id == user_id))
            )
        ).scalar()
    )


async def count(session: AsyncSession, training_id: uuid.UUID) -> int:
    return int(
        (
            await session.execute(
                select(func.count()).select_from(training_participants).where(TP.training_id == training_id)
            )
        ).scalar_one()
    )


async def usernames_in(
    session: AsyncSession, training_id: uuid.UUID, user_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, str]:
    """The usernames of those of ``user_ids`` who are participants."""
    return {r.id: r.username for r in await some(session, training_id, user_ids)}


async def add(session: AsyncSession, training_id: uuid.UUID, user_ids: Sequence[uuid.UUID]) -> None:
    """Register ``user_ids`` (not yet participants) in one multi-row INSERT."""
    if user_ids:
        now = utcnow()
        await session.execute(
            insert(training_participants),
            [{"training_id": training_id, "user_id": u, "joined_at": now} for u in user_ids],
        )


async def remove(session: AsyncSession, training_id: uuid.UUID, user_ids: Sequence[uuid.UUID]) -> None:
    """Unregister ``user_ids`` in one DELETE."""
    if user_ids:
        await session.execute(
            delete(training_participants).where(TP.training_id == training_id, TP.user_id.in_(list(user_ids)))
        )


def _name_order(session: AsyncSession) -> Any:
    """``username`` in Python's string order: code points, which is SQLite's BINARY collation and
    PostgreSQL's ``C`` (byte order of UTF-8); usernames are unique, ``id`` never decides."""
    name: Any = User.username
    if session.get_bind().dialect.name == "postgresql":
        name = name.collate("C")
    return (name, User.id)


async def at_positions(session: AsyncSession, training_id: uuid.UUID, positions: Sequence[int]) -> list[Any]:
    """The participants at ``positions`` (0-based) of the (username, id) order, as column tuples:
    the seeded draw picks positions from the count, and only the drawn rows are read (the
    database orders the participation rows; no per-participant Python objects)."""
    if not positions:
        return []
    numbered = (
        select(*_COLUMNS, func.row_number().over(order_by=_name_order(session)).label("position"))
        .join(training_participants, TP.user_id == User.id)
        .where(TP.training_id == training_id)
        .subquery()
    )
    stmt = select(
        numbered.c.id, numbered.c.username, numbered.c.message_endpoint, numbered.c.notify_client_removed
    ).where(numbered.c.position.in_([p + 1 for p in positions]))
    return list((await session.execute(stmt)).all())


async def page(
    session: AsyncSession, training_id: uuid.UUID, *, limit: int, offset: int
) -> tuple[list[Any], int]:
    """One page of the participants in (username, id) order and their total. (The order is the
    database's: byte order on SQLite; PostgreSQL compares usernames under ``C`` collation so the
    pages follow the same order.)"""
    stmt = _of(training_id).order_by(*_name_order(session)).limit(limit).offset(offset)
    rows = list((await session.execute(stmt)).all())
    return rows, await count(session, training_id)
