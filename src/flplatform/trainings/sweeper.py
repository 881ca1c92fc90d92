"""What runs around the training engine: the periodic sweep (round deadlines, expired
aggregation leases, selected clients offline too long), crash recovery, the lifespan component that starts them with the
notification dispatcher, and the helpers routers use to wake the engine after a commit."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from sqlalchemy import and_, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.db import after_commit
from flplatform.errors import NotFound
from flplatform.kit import timeline
from flplatform.orm import BrokerTopic, ClientHeartbeat, RoundSelection, Training
from flplatform.orm.base import utcnow
from flplatform.trainings import events, fold_ahead, folding, liveness, participants, selection
from flplatform.trainings import notifications as notify
from flplatform.trainings.phases import phase_notification
from flplatform.trainings.repository import get_training, global_model
from flplatform.trainings.rounds import ACTIVE_STATES, round_condition, update_round_open
from flplatform.trainings.runtime import TrainingRuntime

log = logging.getLogger(__name__)


async def sweep(runtime: TrainingRuntime) -> None:
    """Deadlines and expired aggregation leases: re-check the trainings that may move."""
    now = utcnow()
    async with runtime.sessionmaker() as session:
        rows = (
            await session.execute(
                select(
                    Training.id,
                    Training.options,
                    Training.phase_started_at,
                    Training.locked,
                    Training.locked_until,
                ).where(Training.state.in_(ACTIVE_STATES))
            )
        ).all()
    for training_id, options, started, locked, locked_until in rows:
        due = False
        if locked:
            due = locked_until is None or locked_until <= now
        else:
            seconds = (options or {}).get("round_deadline_seconds")
            if seconds and started is not None:
                due = now >= started + dt.timedelta(seconds=float(seconds))
        if due and not runtime.busy(training_id):
            runtime.schedule(training_id)


async def drop_offline(runtime: TrainingRuntime) -> dict[uuid.UUID, set[uuid.UUID]]:
    """Take selected clients not heard from for ``FLP_CLIENT_DROP_AFTER_SECONDS`` out of their
    round (as a client whose notification was rejected is taken out, but it stays a participant),
    so the round completes without them. Returns training → clients dropped."""
    drop_after = runtime.settings.client_drop_after_seconds
    if drop_after <= 0:
        return {}
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=drop_after)
    reason = f"Not heard from for more than {drop_after:g} s."
    dropped: dict[uuid.UUID, set[uuid.UUID]] = {}
    async with runtime.sessionmaker() as session:
        pairs = (
            await session.execute(
                select(Training.id, RoundSelection.user_id)
                .join(
                    RoundSelection,
                    and_(
                        RoundSelection.training_id == Training.id,
                        RoundSelection.round == Training.selection_round,
                    ),
                )
                .where(
                    Training.state.in_(ACTIVE_STATES),
                    Training.locked.is_(False),
                    RoundSelection.dropped_at.is_(None),
                    # heard from, but not lately (confirmed below against both sources)
                    or_(
                        exists().where(
                            ClientHeartbeat.user_id == RoundSelection.user_id,
                            ClientHeartbeat.last_seen_at < cutoff,
                        ),
                        exists().where(
                            BrokerTopic.owner_id == RoundSelection.user_id,
                            BrokerTopic.kind == "topic",
                            BrokerTopic.last_pong < cutoff,
                        ),
                    ),
                )
            )
        ).all()
        gone = await liveness.stale(session, {user_id for _, user_id in pairs}, cutoff)
        candidates: dict[uuid.UUID, set[uuid.UUID]] = {}
        for training_id, user_id in pairs:
            if user_id in gone:
                candidates.setdefault(training_id, set()).add(user_id)
        await session.rollback()
        for training_id, users in candidates.items():
            if runtime.busy(training_id):
                continue  # being advanced in this process: the next sweep looks again
            try:
                training = await get_training(session, training_id, lock=True)
            except NotFound:
                continue
            if training.locked or training.state not in ACTIVE_STATES:
                await session.rollback()
                continue
            model = await global_model(session, training.model_id)
            condition = await round_condition(session, training, model, now)
            answered = condition.arrived.keys() | condition.reporters
            out = (users & condition.members) - answered
            if out:
                await selection.drop(session, training, out, reason)
                for user in await participants.some(session, training.id, out):
                    await events.record(
                        session,
                        training.id,
                        events.PARTICIPANT_DROPPED,
                        {
                            "participant_id": user.id,
                            "participant": user.username,
                            "round": model.round,
                            "reason": reason,
                        },
                    )
                    await notify.drop_pending_for(session, training.id, user.id)
                dropped[training_id] = out
                if condition.kind == "update" and not condition.arrived and condition.members <= out:
                    # Everyone the sampled round asked is gone: ask others rather than end in E.
                    asked = await selection.ask_more(session, training, model.round)
                    kind, body = phase_notification(training, model)
                    if asked and kind is not None:
                        await notify.enqueue(session, training.id, asked, kind, body)
            await session.commit()
    for training_id in dropped:
        log.info(
            "training %s: dropped offline clients %s", training_id, sorted(map(str, dropped[training_id]))
        )
        runtime.schedule(training_id)
    return dropped


async def recover(runtime: TrainingRuntime) -> list[uuid.UUID]:
    """Crash recovery: schedule every active, unclaimed training whose round condition
    already holds (:func:`~flplatform.trainings.rounds.round_condition`, the rule the upload
    path uses). A process killed after acknowledging a round's last update, before
    claiming the round, leaves exactly this state behind; nothing else would look at it
    again. Claiming stays exactly-once across processes: ``advance`` re-checks under the
    training's row lock and claims with the ``training.aggregate`` job."""
    now = utcnow()
    due: list[uuid.UUID] = []
    async with runtime.sessionmaker() as session:
        ids = (
            (
                await session.execute(
                    select(Training.id).where(Training.state.in_(ACTIVE_STATES), Training.locked.is_(False))
                )
            )
            .scalars()
            .all()
        )
        for training_id in ids:
            if await update_round_open(session, training_id, now):
                # Certainly still waiting for updates: skip loading its participants (O(N) ORM
                # rows every recovery interval for a training of thousands of participants).
                continue
            try:
                training = await get_training(session, training_id)
                model = await global_model(session, training.model_id)
            except NotFound:
                continue
            if training.locked or training.state not in ACTIVE_STATES:
                continue
            if (await round_condition(session, training, model, now)).met:
                due.append(training_id)
    for training_id in due:
        if not runtime.busy(training_id):
            log.info("training %s: round condition met but not advanced; advancing now", training_id)
            runtime.schedule(training_id)
    return due


async def run_sweeper(runtime: TrainingRuntime) -> None:
    """Deadlines and leases every FLP_TRAINING_SWEEP_INTERVAL_SECONDS; crash recovery at
    start-up and every FLP_TRAINING_RECOVERY_INTERVAL_SECONDS."""
    loop = asyncio.get_running_loop()
    next_recovery = loop.time()  # at start-up
    while True:
        try:
            if loop.time() >= next_recovery:
                next_recovery = loop.time() + runtime.settings.training_recovery_interval_seconds
                await recover(runtime)
            await sweep(runtime)
            await drop_offline(runtime)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("training sweep failed")
        await asyncio.sleep(runtime.settings.training_sweep_interval_seconds)


def runtime_of(app: FastAPI) -> TrainingRuntime:
    """The server process's engine (set by :func:`training_component`)."""
    runtime: TrainingRuntime = app.state.training_runtime
    return runtime


def advance_after_commit(app: FastAPI, session: AsyncSession, training_id: uuid.UUID) -> None:
    """Once the request's transaction commits, re-check the training (what arrived may complete
    its round)."""
    runtime = runtime_of(app)
    after_commit(session, lambda: runtime.advance(training_id))


def advance_after_update(
    app: FastAPI, session: AsyncSession, training_id: uuid.UUID, size: int, still_open: bool | None = None
) -> None:
    """:func:`advance_after_commit` for a client's update: the round is re-checked under the
    row lock only when a cheap read says it may be complete (``TrainingRuntime.advance_if_due``;
    ``still_open``: that read's answer, made in the upload's transaction),
    alongside the fold of the update (``size`` bytes) into its round's running aggregate
    (:mod:`~flplatform.trainings.folding`)."""
    runtime = runtime_of(app)

    async def folded_then_advanced() -> None:
        timeline.note(training_id, "upload_committed")
        # Side by side: when this update completes the round, the claim's queries and the job's
        # start overlap its fold; the job takes the round's folder and waits for that fold under
        # the folder's lock (a fold that starts after the claim finds no folder and does nothing).
        # Where another process folds the round, that one claims it (folding.on_update).
        await folding.on_update(
            runtime.sessionmaker, runtime.settings, training_id, size, runtime.advance_if_due, still_open
        )

    after_commit(session, folded_then_advanced)


def prepare_round_after_commit(app: FastAPI, session: AsyncSession, training_id: uuid.UUID) -> None:
    """Once the request's transaction commits (a training started), prepare this process to fold
    the round's updates as they arrive (:func:`~flplatform.trainings.fold_ahead.prepare_round`)."""
    runtime = runtime_of(app)
    after_commit(
        session, lambda: fold_ahead.prepare_round(runtime.sessionmaker, runtime.settings, training_id)
    )


def kick_after_commit(app: FastAPI, session: AsyncSession) -> None:
    """Once the request's transaction commits, wake the notification dispatcher."""
    runtime = runtime_of(app)

    async def kick() -> None:
        runtime.kick()

    after_commit(session, kick)


@contextlib.asynccontextmanager
async def training_component(app: FastAPI) -> AsyncIterator[TrainingRuntime]:
    """Lifespan component: the engine, the notification dispatcher and the periodic sweep."""
    runtime = TrainingRuntime(sessionmaker=app.state.sessionmaker, settings=app.state.settings)
    runtime.dispatcher = notify.Dispatcher(
        app.state.sessionmaker,
        app.state.settings,
        on_rejected=runtime.client_rejected,
        on_failed=runtime.client_unreachable,
        after_change=runtime.schedule,
    )
    app.state.training_runtime = runtime
    loops = [
        asyncio.get_running_loop().create_task(runtime.dispatcher.run(), name="notification-dispatcher"),
        asyncio.get_running_loop().create_task(run_sweeper(runtime), name="training-sweeper"),
    ]
    runtime.kick()
    try:
        yield runtime
    finally:
        # The dispatcher stops between database calls (a cancelled aiosqlite call can hang the
        # connection's close); it is cancelled only if that takes longer than a few seconds.
        runtime.dispatcher.stop()
        await asyncio.wait([loops[0]], timeout=5)
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await folding.close_all()
