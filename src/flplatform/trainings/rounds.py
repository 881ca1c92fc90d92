"""What a training's current phase waits for, defined once.

:func:`round_condition` is the rule every path uses to decide that a phase may move on: the
upload path (through ``TrainingRuntime.advance``), the deadline sweep, and crash recovery at
start-up and in the periodic sweep (``TrainingRuntime.recover``), so a round whose condition
was met just before the process died is finished by whichever process looks next.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, case, exists, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from flplatform.orm import (
    GlobalModel,
    LocalModel,
    Metric,
    Model,
    RoundSelection,
    SwagStatistic,
    Training,
    TrainingState,
)
from flplatform.orm.training import ACTIVE_STATES, training_participants
from flplatform.trainings import buffer, participants

PHASE_UPDATE = "update"
PHASE_TEST = "test"
PHASE_SWAG = "swag"
PHASE_DONE = "done"


async def participant_ids(session: AsyncSession, training: Training) -> set[uuid.UUID]:
    """Every participant's id (one column query; see :mod:`.participants`)."""
    return await participants.ids(session, training.id)


async def member_ids(session: AsyncSession, training: Training) -> set[uuid.UUID]:
    """Who the current phase waits for: the participants selected for ``selection_round`` and not
    dropped from it (:mod:`flplatform.trainings.selection`); every participant for trainings
    without a recorded selection. One query over the round's selection (indexed), not over the
    registered participants."""
    if training.selection_round is None:
        return await participant_ids(session, training)
    tp = training_participants.c
    rows = await session.execute(
        select(RoundSelection.user_id).where(
            RoundSelection.training_id == training.id,
            RoundSelection.round == training.selection_round,
            RoundSelection.dropped_at.is_(None),
            exists().where(tp.training_id == training.id, tp.user_id == RoundSelection.user_id),
        )
    )
    return set(rows.scalars())


async def arrivals(
    session: AsyncSession, model_id: uuid.UUID, round_: int, among: set[uuid.UUID] | None = None
) -> dict[uuid.UUID, tuple[uuid.UUID, int]]:
    """Participant → (local model id, sample size) of the updates for this round (one per client)."""
    rows = await session.execute(
        select(LocalModel.owner_id, LocalModel.id, LocalModel.sample_size)
        .where(LocalModel.base_model_id == model_id, LocalModel.round == round_)
        .order_by(LocalModel.created_at)
    )
    out: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}
    for owner, local_id, size in rows:
        if among is None or owner in among:
            out[owner] = (local_id, size)  # the newest wins (re-uploads update in place anyway)
    return out


async def test_reporters(session: AsyncSession, model_id: uuid.UUID, round_: int) -> set[uuid.UUID]:
    rows = await session.execute(
        select(Metric.reporter_id).where(Metric.model_id == model_id, Metric.step == round_).distinct()
    )
    return {r for (r,) in rows if r is not None}


async def swag_arrivals(
    session: AsyncSession, training_id: uuid.UUID, round_: int
) -> dict[uuid.UUID, tuple[uuid.UUID, int]]:
    rows = await session.execute(
        select(SwagStatistic.reporter_id, SwagStatistic.id, SwagStatistic.sample_size).where(
            SwagStatistic.training_id == training_id, SwagStatistic.round == round_
        )
    )
    return {r: (i, s) for r, i, s in rows}


def phase_deadline(training: Training) -> dt.datetime | None:
    seconds = (training.options or {}).get("round_deadline_seconds")
    if not seconds or training.phase_started_at is None or training.state not in ACTIVE_STATES:
        return None
    return training.phase_started_at + dt.timedelta(seconds=float(seconds))


@dataclass
class RoundCondition:
    """What the current phase of an active training has received and whether it may move on."""

    kind: str | None  # "update", "swag", "test", "buffer" (asynchronous); None when it waits for nothing
    members: set[uuid.UUID]
    expired: bool
    arrived: dict[uuid.UUID, tuple[uuid.UUID, int]] = field(default_factory=dict)  # update / swag
    reporters: set[uuid.UUID] = field(default_factory=set)  # test
    skip_tests: bool = False
    buffer_size: int = 0  # "buffer": a new global version needs this many waiting updates

    @property
    def met(self) -> bool:
        """True when the phase must move on now: everything is in, or the deadline passed
        (aggregate with quorum or fail), or there is nobody left (fail)."""
        if self.kind is None:
            return False
        if not self.members or self.expired:
            return True
        if self.kind == "test":
            return self.skip_tests or self.members <= self.reporters
        if self.kind == "buffer":
            return len(self.arrived) >= self.buffer_size
        return self.members <= self.arrived.keys()


async def round_condition(
    session: AsyncSession, training: Training, model: GlobalModel, now: dt.datetime
) -> RoundCondition:
    members = await member_ids(session, training)
    deadline = phase_deadline(training)
    expired = deadline is not None and now >= deadline
    if training.state == TrainingState.SWAG_ROUND:
        arrived = await swag_arrivals(session, training.id, model.round)
        return RoundCondition(
            "swag", members, expired, arrived={k: v for k, v in arrived.items() if k in members}
        )
    if training.state != TrainingState.ONGOING:
        return RoundCondition(None, members, expired)
    if training.phase == PHASE_UPDATE and buffer.is_async(training.options):
        return RoundCondition(
            "buffer",
            members,
            expired,
            # any participant's update: one asked for an older version may answer after a newer
            # draw (with clients_per_round) and is still folded, staleness-weighted
            arrived=await buffer.pending(session, model.id, await participant_ids(session, training)),
            buffer_size=buffer.fedbuff_options(training.options)["buffer_size"],
        )
    if training.phase == PHASE_UPDATE:
        return RoundCondition(
            "update", members, expired, arrived=await arrivals(session, model.id, model.round, members)
        )
    if training.phase == PHASE_TEST:
        return RoundCondition(
            "test",
            members,
            expired,
            reporters=await test_reporters(session, model.id, model.round),
            skip_tests=bool((training.options or {}).get("skip_model_tests")),
        )
    return RoundCondition(None, members, expired)


@functools.cache
def _round_open_statement() -> Any:
    """:func:`update_round_open`'s statement, built once per process (its construction cost more
    CPU than its execution), the training's id a bound parameter."""
    trainings = Training.__table__
    glob = Model.__table__.alias("glob")
    local, local_row = Model.__table__.alias("local"), LocalModel.__table__
    tp, sel = training_participants.c, RoundSelection.__table__.c
    # The members, read from the round's selection (a few rows; the participation table is probed
    # per selected client), or, for trainings without a recorded selection, every participant.
    # Two branches rather than one set filtered per participant: that scanned every registered
    # participant on every upload (issue 18).
    selected_where = (
        sel.training_id == trainings.c.id,
        sel.round == trainings.c.selection_round,
        sel.dropped_at.is_(None),
        exists().where(tp.training_id == sel.training_id, tp.user_id == sel.user_id),
    )
    # An update's owner is a member when one primary-key probe finds them. Not `owner IN (members)`:
    # SQLite re-ran that correlated list for every update row, so each upload cost
    # O(uploaded × participants) (15 ms per upload at 320 of 321 arrived, docs/performance.md).
    is_selected = (
        exists()
        .where(
            sel.training_id == trainings.c.id,
            sel.round == trainings.c.selection_round,
            sel.user_id == local.c.owner_id,
            sel.dropped_at.is_(None),
        )
        .correlate(trainings, local)
    )
    is_participant = (
        exists()
        .where(tp.training_id == trainings.c.id, tp.user_id == local.c.owner_id)
        .correlate(trainings, local)
    )
    unselected = trainings.c.selection_round.is_(None)

    def counted(where: Any, table: Any) -> Any:
        return select(func.count()).select_from(table).where(*where).correlate(trainings).scalar_subquery()

    def arrived_among(*membership: Any) -> Any:
        return (
            select(func.count(func.distinct(local.c.owner_id)))
            .select_from(local_row.join(local, local_row.c.id == local.c.id))
            .where(
                local_row.c.base_model_id == trainings.c.model_id,
                local.c.round == glob.c.round,
                *membership,
            )
            .correlate(trainings, glob)
            .scalar_subquery()
        )

    member_count = case(
        (unselected, counted((tp.training_id == trainings.c.id,), training_participants)),
        else_=counted(selected_where, RoundSelection.__table__),
    )
    arrived_count = case(
        (unselected, arrived_among(is_participant)), else_=arrived_among(is_selected, is_participant)
    )
    return (
        select(
            trainings.c.state,
            trainings.c.phase,
            trainings.c.locked,
            trainings.c.options,
            trainings.c.phase_started_at,
            member_count,
            arrived_count,
        )
        .select_from(trainings.join(glob, glob.c.id == trainings.c.model_id))
        .where(trainings.c.id == bindparam("training_id"))
    )


async def update_round_open(
    session: AsyncSession | AsyncConnection, training_id: uuid.UUID, now: dt.datetime
) -> bool:
    """True only when the training is certainly still waiting for updates: ongoing, in its update
    phase, not claimed, its deadline (if any) not passed, and some current participant has not
    uploaded for the global model's round (participants: those selected for the round and not
    dropped, see :func:`member_ids`). One read, no row lock, no ORM objects.

    The upload path asks this in its own transaction, after recording the update's event, and
    takes the training's row lock after its commit only when this answers False
    (:func:`~flplatform.trainings.contributions.add_update`, ``TrainingRuntime.advance_if_due``):
    an upload that cannot complete the round does not need the lock. It is sound because the
    event's counter row serializes the uploads of a training (see ``add_update``): of concurrent
    uploads, the one that commits last sees all the others' rows, so the round's last update is
    never missed. Anything else (another phase or state, a claim, an expired deadline, the round
    complete) answers False, and the caller takes the full path under the lock."""
    row = (await session.execute(_round_open_statement(), {"training_id": training_id})).one_or_none()
    if row is None:
        return False
    state, phase, locked, options, started, members_n, arrived_n = row
    if state != TrainingState.ONGOING or phase != PHASE_UPDATE or locked or buffer.is_async(options):
        return False  # (an asynchronous training's buffer is counted under the lock)
    seconds = (options or {}).get("round_deadline_seconds")
    if seconds and started is not None and now >= started + dt.timedelta(seconds=float(seconds)):
        return False  # the same deadline as phase_deadline()
    return 0 < int(arrived_n) < int(members_n)
