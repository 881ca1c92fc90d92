"""Billing wired into the training lifecycle, and the lifespan component that keeps holds tidy.

The trainings domain calls round hooks inside the transaction of each state change
(``trainings.hooks``); ``flplatform.jobs.install()`` adds these two there:

* ``ROUND_STARTED`` → :func:`round_started`: first settles any earlier round of the
  training still held (FedDC daisy-chain rounds are never aggregated), then reserves this
  round's funds. A ``PaymentRequired`` (402) propagates and refuses the state change: starting a
  training over HTTP answers 402 and the training stays INITIAL; a later round does not start
  (the training waits in its phase until the runtime re-checks it).
* ``ROUND_AGGREGATED`` → :func:`round_aggregated`: settles the round with the updates that
  were aggregated (participant, sample size), releasing what was reserved but not used.

Trainings that end (error, stop, completion) may leave a hold open; the component's sweep
(:func:`release_ended_trainings`, every ``SWEEP_SECONDS``) releases holds of trainings that are
no longer running, and of trainings that were deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from sqlalchemy import exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import billing
from flplatform.billing.monthly import previous_period, queue_monthly_bills
from flplatform.orm import LocalModel, RoundSelection, Training, TrainingState
from flplatform.orm.billing import Hold, HoldStatus
from flplatform.orm.training import training_participants

log = logging.getLogger(__name__)

SWEEP_SECONDS = 30.0
RUNNING_STATES = (TrainingState.INITIAL, TrainingState.ONGOING, TrainingState.SWAG_ROUND)


async def round_updates(session: AsyncSession, training: Any, round_number: int) -> list[tuple[Any, int]]:
    """(participant, sample size) of the local updates uploaded for the round."""
    rows = await session.execute(
        select(LocalModel.owner_id, LocalModel.sample_size).where(
            LocalModel.base_model_id == training.model_id, LocalModel.round == round_number
        )
    )
    return [(owner, int(samples or 0)) for owner, samples in rows]


async def _settle_earlier_rounds(session: AsyncSession, training: Any, before: int) -> None:
    holds = (
        (
            await session.execute(
                select(Hold).where(
                    Hold.training_id == training.id, Hold.status == HoldStatus.OPEN, Hold.round < before
                )
            )
        )
        .scalars()
        .all()
    )
    for hold in holds:
        round_number = hold.round
        if round_number is None:  # excluded by the query (NULL < before is not true)
            continue
        updates = await round_updates(session, training, round_number)
        if updates:
            await billing.settle_round(session, training, round_number, updates)
        else:
            await billing.release(session, hold, reason=f"round {round_number} ended without updates")


async def _asked_this_round(session: AsyncSession, training: Training, round_number: int) -> list[Any]:
    """The ids of the participants a round waits for: those drawn for it when the training
    samples clients (``options.clients_per_round``, recorded in ``training_round_selections``),
    else everyone — funds are held for the updates that can arrive, not for clients who were not
    asked. One column query (no participant objects)."""
    tp = training_participants.c
    if training.selection_round != round_number:
        stmt = select(tp.user_id).where(tp.training_id == training.id)
    else:
        stmt = select(RoundSelection.user_id).where(
            RoundSelection.training_id == training.id,
            RoundSelection.round == round_number,
            RoundSelection.dropped_at.is_(None),
            exists().where(tp.training_id == training.id, tp.user_id == RoundSelection.user_id),
        )
    return list((await session.execute(stmt)).scalars())


async def round_started(session: AsyncSession, training: Training, round_number: int) -> None:
    await _settle_earlier_rounds(session, training, round_number)
    await billing.reserve_round(
        session, training, round_number, await _asked_this_round(session, training, round_number)
    )


async def round_aggregated(session: AsyncSession, training: Training, round_number: int) -> None:
    await billing.settle_round(
        session, training, round_number, await round_updates(session, training, round_number)
    )


async def release_ended_trainings(session: AsyncSession) -> int:
    """Release the open holds of trainings that ended or no longer exist; returns how many."""
    running = select(Training.id).where(Training.state.in_(RUNNING_STATES))
    holds = (
        (
            await session.execute(
                select(Hold).where(
                    Hold.status == HoldStatus.OPEN,
                    Hold.training_id.is_not(None),
                    Hold.training_id.not_in(running),
                )
            )
        )
        .scalars()
        .all()
    )
    released = 0
    for hold in holds:
        training = await session.get(Training, hold.training_id)
        reason = f"training ended ({training.state.value})" if training is not None else "training deleted"
        released += await billing.release(session, hold, reason=reason)
    return released


@contextlib.asynccontextmanager
async def billing_component(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan component: runs the hold sweep and, once a month has ended, queues its monthly
    bills (``billing.monthly_bills``, once per period whichever server queues it; the hooks and
    the job kind are ``flplatform.jobs.install``'s)."""
    queued: str | None = None

    async def sweep_forever() -> None:
        nonlocal queued
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                async with app.state.sessionmaker() as session:
                    if await release_ended_trainings(session):
                        await session.commit()
                if queued != previous_period():
                    async with app.state.sessionmaker() as session:
                        queued = await queue_monthly_bills(session)
                        await session.commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("billing sweep failed")

    task = asyncio.create_task(sweep_forever(), name="billing-hold-sweep")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
