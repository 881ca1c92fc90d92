"""Trainings: create, describe, list, delete, manage participants, start and stop.

The state machine these calls set going is :mod:`flplatform.trainings.phases` (transitions) run
by :mod:`flplatform.trainings.runtime` (the engine). Permission checks on a single training are
the dependencies of :mod:`flplatform.trainings.dependencies` (the routes receive an authorised
``Training``); lists filter with the training policy's clause (``readable()``). Nothing here
commits: the request's session does.

States (``Training.state``) and phases (``Training.phase``)::

    I --start (>= 1 participant)--> O/update
    O/update --every current participant uploaded (or deadline + quorum)--> aggregation
        aggregation (claimed under a row lock, runs off the event loop) -->
            SWAG training:  S/swag  --all SWAG statistics (or deadline + quorum)--> O/…
            otherwise:      O/test (MODEL_TEST_ROUND) unless options.skip_model_tests
    O/test --every participant reported test metrics at step == round (or deadline)-->
        O/update (UPDATE_ROUND_START, next round)  or  C (TRAINING_FINISHED)
    any failure (aggregation error, quorum missed, client unreachable, no participants) --> E
    actor's stop --> E ("Stopped by the actor")
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import BadRequest, Conflict, Forbidden, Unprocessable
from flplatform.kit.pagination import paginate
from flplatform.models import service as model_service
from flplatform.models.schemas import ModelRead
from flplatform.orm import (
    GlobalModel,
    LocalModel,
    Model,
    SWAGModel,
    Training,
    TrainingState,
    UncertaintyMethod,
    User,
)
from flplatform.orm.base import utcnow
from flplatform.permissions import Requester, can_create, ensure_visible, readable, users_without_role
from flplatform.permissions.requester import ANY_ROLE
from flplatform.permissions.resources import oversees, oversees_clause, participations
from flplatform.trainings import aggregate, liveness, membership, participants, selection
from flplatform.trainings import notifications as notify
from flplatform.trainings.phases import (
    begin_update_round,
    fail,
    phase_notification,
    remove_users,
    start_body,
    state_changed,
)
from flplatform.trainings.repository import global_model, training_for_model
from flplatform.trainings.rounds import ACTIVE_STATES, PHASE_UPDATE, arrivals, member_ids, phase_deadline
from flplatform.trainings.schemas import ParticipantStatus, TrainingCreate, TrainingDetail, TrainingRead

_COLUMNS = Training.__mapper__.column_attrs


def is_actor(training: Training, user: User) -> bool:
    return training.actor_id == user.id or user.is_superuser


# --------------------------------------------------------------------------- reading


async def describe_many(session: AsyncSession, trainings: Sequence[Training]) -> list[TrainingRead]:
    """Training descriptions in one extra statement (the global models' rounds), whatever their number."""
    rounds: dict[uuid.UUID, int] = (
        {
            model_id: round_
            for model_id, round_ in await session.execute(
                select(Model.id, Model.round).where(Model.id.in_([t.model_id for t in trainings]))
            )
        }
        if trainings
        else {}
    )
    collections = await membership.collections_of(session, [t.id for t in trainings])
    registered = await participants.ids_of(session, [t.id for t in trainings])
    out = []
    for training in trainings:
        columns = {a.key: getattr(training, a.key) for a in _COLUMNS}  # not the participant objects
        item = TrainingRead.model_validate(
            {**columns, "participants": sorted(registered[training.id], key=str)}
        )
        item.round = rounds.get(training.model_id)
        item.mu = (training.options or {}).get("mu")
        item.collections = collections.get(training.id, [])
        out.append(item)
    return out


async def describe(
    session: AsyncSession, training: Training, *, status_page: tuple[int, int] | None = None
) -> TrainingDetail:
    """One training with the progress of its current round (arrived and expected updates) and
    every participant's liveness and selection (``status_page`` = (limit, offset): only that page
    of ``participant_status``, in the same (username, id) order)."""
    base = (await describe_many(session, [training]))[0]
    members = await member_ids(session, training)
    arrived = await arrivals(session, training.model_id, base.round or 0, members)
    if status_page is None:
        shown = await participants.candidates(session, training.id)
    else:
        shown, _ = await participants.page(session, training.id, limit=status_page[0], offset=status_page[1])
    return TrainingDetail(
        **base.model_dump(),
        local_models_arrived=len(arrived),
        local_models_expected=len(members),
        phase_deadline=phase_deadline(training),
        participant_status=await participant_status(session, training, members, shown),
    )


async def participant_status(
    session: AsyncSession, training: Training, members: set[uuid.UUID], shown: Sequence[Any]
) -> list[ParticipantStatus]:
    """The liveness and selection of the participants ``shown`` (column tuples), in their order."""
    now, offline_after = utcnow(), liveness.settings_of(session).client_offline_after_seconds
    seen = await liveness.last_seen(session, [u.id for u in shown])
    return [
        ParticipantStatus(
            id=u.id,
            username=u.username,
            liveness=liveness.status(seen.get(u.id), now, offline_after),  # type: ignore[arg-type]
            last_seen=seen.get(u.id),
            selected=training.state in ACTIVE_STATES and u.id in members,
        )
        for u in shown
    ]


async def participants_page(
    session: AsyncSession, training: Training, *, limit: int, offset: int
) -> tuple[list[ParticipantStatus], int]:
    """One page of the participants' status (username order) and their total."""
    shown, total = await participants.page(session, training.id, limit=limit, offset=offset)
    return await participant_status(session, training, await member_ids(session, training), shown), total


async def _list(
    requester: Requester, condition: ColumnElement[bool], *, limit: int, offset: int
) -> tuple[list[Training], int]:
    return await paginate(
        requester.session,
        select(Training).where(readable(requester, Training), condition),
        order_by=(Training.created_at, Training.id),
        limit=limit,
        offset=offset,
    )


async def list_run_or_overseen(
    requester: Requester, *, limit: int, offset: int
) -> tuple[list[Training], int]:
    """Trainings the caller acts in or oversees (organisation admins and coaches); every one for
    superusers (the policy layer lets them read all, so their list shows all)."""
    condition = (
        true()
        if requester.is_superuser
        else or_(Training.actor_id == requester.id, oversees_clause(requester))
    )
    return await _list(requester, condition, limit=limit, offset=offset)


async def list_mine(requester: Requester, *, limit: int, offset: int) -> tuple[list[Training], int]:
    """Trainings the caller acts in or takes part in."""
    return await _list(
        requester,
        or_(Training.actor_id == requester.id, Training.id.in_(participations(requester))),
        limit=limit,
        offset=offset,
    )


async def training_models(
    requester: Requester, training: Training, *, latest: bool, limit: int, offset: int
) -> tuple[list[ModelRead], int]:
    """A page of the global model and the local updates the caller may read (all of them for the
    actor, overseers and superusers, their own for a participant), and their total; ``latest``:
    the newest per client. (The newest-per-client choice is made on the rows, so the page is
    cut from them: only the page is described.)"""
    session = requester.session
    model = await global_model(session, training.model_id)
    stmt = (
        select(LocalModel)
        .where(LocalModel.base_model_id == model.id, readable(requester, Model))
        .order_by(LocalModel.round, LocalModel.created_at)
    )
    if not (training.actor_id == requester.id or requester.is_superuser or oversees(requester)):
        stmt = stmt.where(LocalModel.owner_id == requester.id)
    rows: list[Model] = list((await session.execute(stmt)).scalars())
    if latest:
        newest: dict[uuid.UUID, Model] = {}
        for row in rows:
            newest[row.owner_id] = row
        rows = list(newest.values())
    every = [model, *rows]
    return await model_service.describe_many(session, every[offset : offset + limit]), len(every)


# --------------------------------------------------------------------------- participants


async def _users(session: AsyncSession, ids: Sequence[uuid.UUID]) -> list[User]:
    wanted = list(dict.fromkeys(ids))
    users = list((await session.execute(select(User).where(User.id.in_(wanted)))).scalars())
    missing = set(wanted) - {u.id for u in users}
    if missing:
        raise BadRequest(
            f"Not all provided users were found: {sorted(str(m) for m in missing)}", code="users_not_found"
        )
    return users


async def _check_participants(
    requester: Requester, organization_id: uuid.UUID | None, ids: Sequence[uuid.UUID]
) -> None:
    """Every participant belongs to the training's organisation (or, like it, to none) and the
    caller holds a role (admin or coach) for each of them — one query for all (Kolibri's
    ``has_role_for_user``). Unknown ids are left to :func:`_users` (400, as the reference)."""
    users = list(
        (await requester.session.execute(select(User).where(User.id.in_(list(dict.fromkeys(ids)))))).scalars()
    )
    foreign = sorted(str(u.id) for u in users if u.organization_id != organization_id)
    if foreign:
        raise BadRequest(
            f"Participants must belong to the training's organisation: {foreign}",
            code="participant_outside_organization",
        )
    uncovered = await users_without_role(requester, ANY_ROLE, users)
    if uncovered:
        raise Forbidden(
            f"You hold no role (admin or coach) for these users: {sorted(str(u.id) for u in uncovered)}",
            code="no_role_for_participant",
        )


async def add_participants(requester: Requester, training: Training, ids: Sequence[uuid.UUID]) -> list[User]:
    """Register participants (the training is the caller's to manage). Late joiners get the
    notification of the phase in progress so they can take part."""
    session = requester.session
    await _check_participants(requester, training.organization_id, ids)
    users = await _users(session, ids)
    present = await participants.present(session, training.id, [u.id for u in users])
    new = sorted((u for u in users if u.id not in present), key=lambda u: (u.username, u.id))
    if not new:
        return []
    await participants.add(session, training.id, [u.id for u in new])
    training.last_update = utcnow()
    if training.state in ACTIVE_STATES:
        model = await global_model(session, training.model_id)
        await notify.enqueue(session, training.id, new, notify.TRAINING_START, start_body(training, model))
        kind, body = phase_notification(training, model)
        # With sampling, late joiners wait for the next round's draw.
        if kind is not None and await selection.join_current(session, training, new):
            await notify.enqueue(session, training.id, new, kind, body)
    await session.flush()
    return new


async def remove_participants(
    session: AsyncSession, training: Training, ids: Sequence[uuid.UUID]
) -> list[User]:
    users = await _users(session, ids)
    present = await participants.present(session, training.id, [u.id for u in users])
    gone = [u for u in users if u.id in present]
    if not gone:
        return []
    await remove_users(session, training, gone, "Removed from the training by its actor or an administrator.")
    return gone


# --------------------------------------------------------------------------- lifecycle


async def create_training(requester: Requester, data: TrainingCreate) -> Training:
    """A new training in state I on the caller's global model (cloned if it already backs one).
    Needs a role (admin or coach) in the model's organisation and one for every participant."""
    session, actor = requester.session, requester.user
    assert actor is not None
    model = await model_service.get_model(session, data.model_id)
    await ensure_visible(requester, model, f"Model {data.model_id}", None)
    if not await can_create(
        requester, Training(organization_id=model.organization_id, actor_id=requester.id)
    ):
        raise Forbidden(
            "Creating trainings needs a role (admin or coach) in your organisation.", code="no_role"
        )
    await _check_participants(requester, model.organization_id, data.clients)
    if data.collections:
        members = await membership.check_collections(requester, model.organization_id, data.collections)
        await _check_participants(requester, model.organization_id, members)
    if not isinstance(model, GlobalModel):
        raise BadRequest("A training needs a global model (not a local update).")
    if model.owner_id != actor.id and not actor.is_superuser:
        raise Forbidden("Only the model's owner may create a training with it.")
    if data.uncertainty_method == UncertaintyMethod.SWAG and not isinstance(model, SWAGModel):
        raise BadRequest(
            "uncertainty_method SWAG needs a model uploaded with type=SWAG.", code="swag_model_required"
        )
    if await training_for_model(session, model.id) is not None:
        model = await model_service.clone_global_model(session, model)
    clients = await _users(session, data.clients)
    options: dict[str, Any] = data.options.model_dump(mode="json")
    try:
        aggregate.check_aggregator_options(options)
    except ValueError as exc:
        raise Unprocessable(f"options: {exc}", code="invalid_aggregator_options") from None
    training = Training(
        model_id=model.id,
        actor_id=actor.id,
        state=TrainingState.INITIAL,
        target_num_updates=data.target_num_updates,
        uncertainty_method=data.uncertainty_method,
        aggregation_method=data.aggregation_method,
        options=options,
        metric_names=list(data.metric_names),
        locked=False,
        phase=PHASE_UPDATE,
        start_round=model.round,
        participants=clients,
    )
    session.add(training)
    await session.flush()
    await membership.attach(session, training, data.collections)
    return training


async def delete_training(session: AsyncSession, training: Training) -> None:
    """The global model stays."""
    await session.delete(training)
    await session.flush()


async def start_training(session: AsyncSession, training: Training) -> None:
    if training.state != TrainingState.INITIAL:
        raise BadRequest(f"Training {training.id} is not in state INITIAL!", code="wrong_state")
    await membership.resolve(session, training)
    everyone = await participants.candidates(session, training.id)
    if not everyone:
        raise BadRequest("At least one participant must be registered!", code="no_participants")
    model = await global_model(session, training.model_id)
    training.state = TrainingState.ONGOING
    training.start_round = model.round
    await state_changed(session, training, TrainingState.INITIAL, round=model.round)
    await notify.enqueue(session, training.id, everyone, notify.TRAINING_START, start_body(training, model))
    await begin_update_round(session, training, model)
    await session.flush()


async def stop_training(session: AsyncSession, training: Training, reason: str) -> None:
    if training.state in (TrainingState.COMPLETED, TrainingState.ERROR):
        raise Conflict(f"Training {training.id} has already ended (state {training.state.value}).")
    was_active = training.state in ACTIVE_STATES
    await fail(session, training, reason, notify_clients=was_active)
