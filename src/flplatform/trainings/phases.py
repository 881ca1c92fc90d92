"""The round state machine's transitions (see :mod:`flplatform.trainings.runtime` for what
drives them): entering a phase, the notifications each phase sends, ending in C or E, removing
participants mid-training, and FedDC's daisy-chain rounds. Every function runs inside the
caller's transaction and never commits."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.orm import GlobalModel, Training, TrainingState, UncertaintyMethod, User
from flplatform.orm.base import utcnow
from flplatform.trainings import events, hooks, membership, participants, selection
from flplatform.trainings import notifications as notify
from flplatform.trainings.participants import Candidate
from flplatform.trainings.repository import global_model
from flplatform.trainings.rounds import (
    ACTIVE_STATES,
    PHASE_DONE,
    PHASE_SWAG,
    PHASE_TEST,
    PHASE_UPDATE,
)

log = logging.getLogger(__name__)


def _mu(training: Training) -> float | None:
    mu: float | None = (training.options or {}).get("mu")
    return mu


def start_body(training: Training, model: GlobalModel) -> dict[str, Any]:
    """TRAINING_START's body."""
    return {
        "global_model_uuid": str(model.id),
        "round": model.round,
        "aggregation_method": training.aggregation_method.value,
        "uncertainty_method": training.uncertainty_method.value,
        "mu": _mu(training),
        "target_num_updates": training.target_num_updates,
    }


def _round_body(training: Training, model: GlobalModel, download: uuid.UUID | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"round": model.round, "global_model_uuid": str(download or model.id)}
    body["training_model_uuid"] = str(model.id)  # where updates go (differs from the download in FedDC)
    if _mu(training) is not None:
        body["mu"] = _mu(training)
    return body


def phase_notification(training: Training, model: GlobalModel) -> tuple[str | None, dict[str, Any]]:
    """The notification of the phase in progress (what a late joiner is sent)."""
    if training.state == TrainingState.SWAG_ROUND:
        return notify.SWAG_ROUND_START, _round_body(training, model)
    if training.phase == PHASE_UPDATE:
        return notify.UPDATE_ROUND_START, _round_body(training, model)
    if training.phase == PHASE_TEST:
        return notify.MODEL_TEST_ROUND, _round_body(training, model)
    return None, {}


def _enter_phase(training: Training, phase: str) -> None:
    training.phase = phase
    training.phase_started_at = utcnow()
    training.last_update = utcnow()


async def state_changed(
    session: AsyncSession, training: Training, previous: TrainingState, **data: Any
) -> None:
    """Record a ``state_changed`` event (a no-op when the state did not change)."""
    if training.state != previous:
        await events.record(
            session,
            training.id,
            events.STATE_CHANGED,
            {
                "state": training.state.value,
                "previous_state": previous.value,
                "phase": training.phase,
                **data,
            },
        )


async def begin_update_round(
    session: AsyncSession,
    training: Training,
    model: GlobalModel,
    recipients: Sequence[Candidate] | None = None,
    downloads: dict[uuid.UUID, uuid.UUID] | None = None,
) -> None:
    """Enter the update phase of ``model.round`` (the round-started hooks may refuse it): the
    round's clients are drawn from every participant (only the drawn rows are read when sampling)
    and recorded (:mod:`.selection`); a daisy-chain round (``downloads``) keeps ``recipients``, the
    clients of the chain."""
    _enter_phase(training, PHASE_UPDATE)
    if downloads is None or recipients is None:
        registered = await participants.count(session, training.id)
        recipients = await selection.select_round(session, training, model.round, registered=registered)
    else:
        registered = await participants.count(session, training.id)
        await selection.record(session, training, model.round, recipients)
    await hooks.ROUND_STARTED(session, training, model.round)
    await events.record(
        session,
        training.id,
        events.ROUND_STARTED,
        {
            "round": model.round,
            "participants": len(recipients),
            "registered": registered,
            "daisy_chained": bool(downloads),
        },
    )
    if downloads:
        await notify.enqueue(
            session,
            training.id,
            recipients,
            notify.UPDATE_ROUND_START,
            lambda u: _round_body(training, model, downloads.get(u.id)),
        )
    else:
        await notify.enqueue(
            session, training.id, recipients, notify.UPDATE_ROUND_START, _round_body(training, model)
        )


async def after_aggregation(session: AsyncSession, training: Training, model: GlobalModel) -> None:
    """After an update aggregation: a SWAG round, a test round, the next round or the end."""
    if training.uncertainty_method == UncertaintyMethod.SWAG:
        previous = training.state
        training.state = TrainingState.SWAG_ROUND
        _enter_phase(training, PHASE_SWAG)
        await state_changed(session, training, previous, round=model.round)
        await notify.enqueue(
            session,
            training.id,
            await selection.members(session, training),
            notify.SWAG_ROUND_START,
            _round_body(training, model),
        )
        return
    await test_or_next(session, training, model)


async def test_or_next(session: AsyncSession, training: Training, model: GlobalModel) -> None:
    previous = training.state
    training.state = TrainingState.ONGOING
    if (training.options or {}).get("skip_model_tests"):
        await state_changed(session, training, previous, round=model.round)
        await next_or_finish(session, training, model)
        return
    _enter_phase(training, PHASE_TEST)
    await state_changed(session, training, previous, round=model.round)
    await events.record(session, training.id, events.TEST_ROUND_STARTED, {"round": model.round})
    await notify.enqueue(
        session,
        training.id,
        await selection.members(session, training),
        notify.MODEL_TEST_ROUND,
        _round_body(training, model),
    )


async def next_or_finish(session: AsyncSession, training: Training, model: GlobalModel) -> None:
    if model.round - training.start_round >= training.target_num_updates:
        previous = training.state
        training.state = TrainingState.COMPLETED
        _enter_phase(training, PHASE_DONE)
        await state_changed(session, training, previous, round=model.round)
        actor = await session.get(User, training.actor_id)
        recipients: list[Any] = await participants.candidates(session, training.id)
        if actor is not None and actor.id not in {r.id for r in recipients}:
            recipients.append(actor)
        await notify.enqueue(
            session, training.id, recipients, notify.TRAINING_FINISHED, {"global_model_uuid": str(model.id)}
        )
        return
    if (training.options or {}).get("collections_each_round"):
        await membership.resolve(session, training)
    await begin_update_round(session, training, model)


async def fail(
    session: AsyncSession, training: Training, reason: str, *, notify_clients: bool = True
) -> None:
    """The training ends in E with ``reason``; pending notifications are dropped."""
    log.warning("training %s -> Error: %s", training.id, reason)
    previous = training.state
    training.state = TrainingState.ERROR
    training.error_reason = reason[:2000]
    training.locked = False
    training.locked_until = None
    _enter_phase(training, PHASE_DONE)
    await events.record(session, training.id, events.ERROR, {"reason": training.error_reason})
    await state_changed(session, training, previous, error_reason=training.error_reason)
    await notify.drop_pending_for(session, training.id)
    if notify_clients:
        await notify.enqueue(
            session,
            training.id,
            await participants.candidates(session, training.id),
            notify.TRAINING_FINISHED,
            {
                "global_model_uuid": str(training.model_id),
                "state": "E",
                "error_reason": training.error_reason,
            },
        )


async def remove_users(session: AsyncSession, training: Training, users: Sequence[Any], reason: str) -> None:
    """Drop participants (by the actor, or as stragglers/rejecters: users or participant column
    tuples) with one DELETE on the association table; those who opted in are told."""
    ids = [u.id for u in users]
    await participants.remove(session, training.id, ids)
    for user in users:
        await events.record(
            session,
            training.id,
            events.PARTICIPANT_REMOVED,
            {"participant_id": user.id, "participant": user.username, "reason": reason},
        )
    for user_id in ids:
        await notify.drop_pending_for(session, training.id, user_id)
    if training.state in ACTIVE_STATES:
        model = await global_model(session, training.model_id)
        await notify.enqueue(
            session,
            training.id,
            [u for u in users if u.notify_client_removed],
            notify.CLIENT_REMOVED,
            notify.client_removed_body(model.id, model.round, reason),
        )
    training.last_update = utcnow()
    await session.flush()


# --------------------------------------------------------------------------- FedDC


def daisy_chain_period(training: Training) -> int:
    return int((training.options or {}).get("daisy_chain_period") or 0)


def aggregation_period(training: Training) -> int:
    d = daisy_chain_period(training)
    return int((training.options or {}).get("aggregation_period") or 2 * d)


def derangement(items: Sequence[uuid.UUID], rng: random.Random) -> list[uuid.UUID]:
    """A uniformly random permutation without fixed points (rejection sampling)."""
    if len(items) < 2:
        return list(items)
    while True:
        perm = list(items)
        rng.shuffle(perm)
        if all(a != b for a, b in zip(perm, items, strict=True)):
            return perm


async def participant_order(
    session: AsyncSession, training: Training, owners: Iterable[uuid.UUID]
) -> Callable[[uuid.UUID], tuple[str, uuid.UUID]]:
    """Sort key of ``owners`` (participant ids) that is the same in every run (ids are random,
    names are chosen); reads the names of ``owners`` only. (Names of users no longer
    participating sort as "", as before.)"""
    return name_order(await participants.usernames_in(session, training.id, owners))


def name_order(names: Mapping[uuid.UUID, str]) -> Callable[[uuid.UUID], tuple[str, uuid.UUID]]:
    """Sort key of user ids by (username, id); ids missing from ``names`` sort first."""
    return lambda owner: (names.get(owner, ""), owner)


async def daisy_chain_step(
    session: AsyncSession,
    training: Training,
    model: GlobalModel,
    chosen: dict[uuid.UUID, tuple[uuid.UUID, int]],
) -> None:
    """FedDC round without aggregation: every d rounds the local models move to other clients
    (derangement), otherwise each client continues from its own local model."""
    done = model.round + 1 - training.start_round
    owners = sorted(chosen, key=await participant_order(session, training, chosen))
    locals_ = [chosen[o][0] for o in owners]
    if done % daisy_chain_period(training) == 0 and len(owners) >= 2:
        seed = (training.options or {}).get("seed")
        rng = random.Random(f"{training.id if seed is None else seed}:{model.round}")
        assigned = derangement(locals_, rng)
    else:
        assigned = locals_
    downloads = dict(zip(owners, assigned, strict=True))
    chain = await selection.members(session, training)  # the chain keeps the round's clients
    model.round += 1
    await session.flush()
    await begin_update_round(session, training, model, chain, downloads)


def aggregates_now(training: Training, model: GlobalModel) -> bool:
    """False for FedDC rounds that only pass the local models on."""
    if daisy_chain_period(training) < 1:
        return True
    done = model.round + 1 - training.start_round
    return done % aggregation_period(training) == 0 or done >= training.target_num_updates
