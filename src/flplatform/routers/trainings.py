"""Trainings: create, inspect, manage participants, start, stop, list their models.

Permissions come from ``flplatform.permissions`` (``TRAINING_POLICY``, see
``permissions/resources.py``): the actor, the participants and the organisation's role holders
read; the actor and the organisation's admins manage; lists filter with the policy's clause.
Trainings the caller may not see are 404 (403 between users of the organisation-less DLR space,
as the reference answered); visible trainings the caller may not manage are 403.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Request, status
from sqlalchemy import or_, select, true
from sqlalchemy.orm import selectinload

from flplatform.auth.dependencies import AuthenticatedRequester, CurrentUser
from flplatform.db import SessionDep, after_commit
from flplatform.errors import BadRequest, Forbidden, responses
from flplatform.kit.schemas import Detail
from flplatform.models import service as model_service
from flplatform.models.schemas import ModelRead
from flplatform.orm import LocalModel, Model, Training, User
from flplatform.permissions import (
    Requester,
    can_create,
    can_update,
    ensure_visible,
    readable,
    users_without_role,
)
from flplatform.permissions.requester import ANY_ROLE
from flplatform.permissions.resources import oversees, oversees_clause, participations
from flplatform.trainings import notifications as notify
from flplatform.trainings import service as training_service
from flplatform.trainings.schemas import (
    ClientList,
    NotificationKey,
    StopRequest,
    TrainingCreate,
    TrainingCreated,
    TrainingDetail,
    TrainingRead,
)
from flplatform.trainings.service import runtime_of

router = APIRouter(prefix="/api/trainings", tags=["trainings"])
# GET /api/users/trainings/ (included before the users router so /api/users/{id}/ does not swallow it).
users_router = APIRouter(prefix="/api/users", tags=["trainings"])


async def _read_many(session: SessionDep, trainings: list[Training]) -> list[TrainingRead]:
    """Training descriptions in one extra statement (the global models' rounds), whatever their number."""
    rounds = (
        dict(
            (
                await session.execute(
                    select(Model.id, Model.round).where(Model.id.in_([t.model_id for t in trainings]))
                )
            ).all()
        )
        if trainings
        else {}
    )
    out = []
    for training in trainings:
        item = TrainingRead.model_validate(training, from_attributes=True)
        item.participants = sorted(training_service.participant_ids(training), key=str)
        item.round = rounds.get(training.model_id)
        item.mu = (training.options or {}).get("mu")
        out.append(item)
    return out


async def _read(session: SessionDep, training: Training) -> TrainingRead:
    return (await _read_many(session, [training]))[0]


NOT_A_MEMBER = "You are neither the actor nor a participant of this training."


async def _readable(requester: Requester, training_id: uuid.UUID, *, lock: bool = False) -> Training:
    training = await training_service.get_training(requester.session, training_id, lock=lock)
    await ensure_visible(requester, training, f"Training {training_id}", NOT_A_MEMBER)
    return training


async def _managed(requester: Requester, training_id: uuid.UUID) -> Training:
    """Row-locked; 404 when invisible, 403 when visible but not the caller's to manage."""
    training = await _readable(requester, training_id, lock=True)
    if not await can_update(requester, training):
        raise Forbidden("Only the training's actor (or an organisation admin) may do this.")
    return training


async def _users(session: SessionDep, ids: list[uuid.UUID]) -> list[User]:
    return list((await session.execute(select(User).where(User.id.in_(list(dict.fromkeys(ids)))))).scalars())


async def _check_participants(
    requester: Requester, organization_id: uuid.UUID | None, ids: list[uuid.UUID]
) -> None:
    """Every participant belongs to the training's organisation (or, like it, to none) and the
    caller holds a role (admin or coach) for each of them — one query for all (Kolibri's
    ``has_role_for_user``). Unknown ids are left to the service (400, as the reference)."""
    users = await _users(requester.session, ids)
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


async def _list(requester: Requester, *extra: object) -> list[Training]:
    stmt = (
        select(Training)
        .options(selectinload(Training.participants))
        .where(readable(requester, Training), *extra)
        .order_by(Training.created_at, Training.id)
    )
    return list((await requester.session.execute(stmt)).scalars())


def _schedule(request: Request, session: SessionDep, training_id: uuid.UUID) -> None:
    runtime = runtime_of(request.app)
    after_commit(session, lambda: runtime.advance(training_id))


@router.get(
    "/",
    response_model=list[TrainingRead],
    summary="List the trainings I run or oversee",
    description="Trainings the caller created (actor); for organisation admins and organisation coaches "
    "every training of their organisation; for superusers every training. `GET /api/users/trainings/` "
    "lists those the caller acts in or participates in. Never another organisation's (superusers aside).",
    responses=responses(401),
)
async def list_trainings(requester: AuthenticatedRequester) -> list[TrainingRead]:
    # Superusers read every training (the policy layer says so), so their list shows every one too.
    mine_or_overseen = (
        true()
        if requester.is_superuser
        else or_(Training.actor_id == requester.id, oversees_clause(requester))
    )
    rows = await _list(requester, mine_or_overseen)
    return await _read_many(requester.session, rows)


@router.post(
    "/",
    response_model=TrainingCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create a training",
    description="The model's owner becomes the actor. `options` is validated (unknown keys → 422): "
    "`daisy_chain_period`, `aggregation_period`, `mu`, `round_deadline_seconds`, `min_quorum`, `straggler_policy`, "
    "`skip_model_tests`, `uncertainty {N, softmax, seed, min_var}`, `aggregator` (+ `aggregator_options`), `dp`, "
    "`epochs` (local epochs per round, billed per sample-epoch), `billing_samples_per_update`. "
    "With `daisy_chain_period` d > 0, `target_num_updates` is multiplied by d (the reference's rule). A model that "
    "already backs a training is cloned. `uncertainty_method=SWAG` needs a `type=SWAG` model. In an "
    "organisation the actor needs a role (admin or coach) there and, for every participant, a role on the "
    "organisation or on a collection the participant is a member of (403 `no_role_for_participant`); "
    "participants must belong to the model's organisation (400).",
    responses=responses(400, 401, 403, 404, 422),
)
async def create_training(requester: AuthenticatedRequester, data: TrainingCreate) -> TrainingCreated:
    session = requester.session
    model = await model_service.get_model(session, data.model_id)
    await ensure_visible(requester, model, f"Model {data.model_id}", None)
    if not await can_create(
        requester, Training(organization_id=model.organization_id, actor_id=requester.id)
    ):
        raise Forbidden(
            "Creating trainings needs a role (admin or coach) in your organisation.", code="no_role"
        )
    await _check_participants(requester, model.organization_id, data.clients)
    assert requester.user is not None
    training = await training_service.create_training(session, requester.user, data)
    return TrainingCreated(training_id=training.id)


@router.get(
    "/{training_id}/",
    response_model=TrainingDetail,
    summary="Get a training",
    description="Actor, participants, organisation admins and organisation coaches. `local_models_arrived` counts distinct participants that uploaded "
    "for the CURRENT round (the reference counted all rounds); `round`/`phase` let polling clients follow; "
    "`mu` (FedProx) is included.",
    responses=responses(401, 403, 404),
)
async def get_training(requester: AuthenticatedRequester, training_id: uuid.UUID) -> TrainingDetail:
    session = requester.session
    training = await _readable(requester, training_id)
    base = await _read(session, training)
    members = training_service.participant_ids(training)
    arrived = await training_service.arrivals(session, training.model_id, base.round or 0, members)
    return TrainingDetail(
        **base.model_dump(),
        local_models_arrived=len(arrived),
        local_models_expected=len(members),
        phase_deadline=training_service.phase_deadline(training),
    )


@router.delete(
    "/{training_id}/",
    response_model=Detail,
    summary="Delete a training",
    description="Actor or organisation admin. The global model stays.",
    responses=responses(401, 403, 404),
)
async def delete_training(
    session: SessionDep, requester: AuthenticatedRequester, training_id: uuid.UUID
) -> Detail:
    training = await _managed(requester, training_id)
    await session.delete(training)
    await session.flush()
    return Detail(detail="Training removed!")


@router.put(
    "/{training_id}/clients/",
    response_model=Detail,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Register participants",
    description='Actor or organisation admin (the reference let participants too). `{"clients": [user '
    "ids]}`, with the same participant rules as creation. Joining a running training sends the current "
    "phase's notification to the newcomers.",
    responses=responses(400, 401, 403, 404, 422),
)
async def add_clients(
    session: SessionDep,
    requester: AuthenticatedRequester,
    request: Request,
    training_id: uuid.UUID,
    data: ClientList,
) -> Detail:
    training = await _managed(requester, training_id)
    await _check_participants(requester, training.organization_id, data.clients)
    await training_service.add_participants(session, training, data.clients)
    _schedule(request, session, training.id)
    return Detail(detail="Users registered as participants!")


@router.delete(
    "/{training_id}/clients/",
    response_model=Detail,
    summary="Remove participants",
    description="Actor or organisation admin. Removed clients that opted in (`notify_client_removed`) get "
    "CLIENT_REMOVED; the round condition "
    "is re-checked (a removal can complete the round).",
    responses=responses(400, 401, 403, 404, 422),
)
async def remove_clients(
    session: SessionDep,
    requester: AuthenticatedRequester,
    request: Request,
    training_id: uuid.UUID,
    data: ClientList,
) -> Detail:
    training = await _managed(requester, training_id)
    await training_service.remove_participants(session, training, data.clients)
    _schedule(request, session, training.id)
    return Detail(detail="Users removed from training participants!")


@router.post(
    "/{training_id}/start/",
    response_model=Detail,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start a training",
    description="Actor or organisation admin. Needs ≥ 1 participant and state I. Sends TRAINING_START "
    "and UPDATE_ROUND_START to every participant.",
    responses=responses(400, 401, 403, 404, 402),
)
async def start_training(
    session: SessionDep, requester: AuthenticatedRequester, request: Request, training_id: uuid.UUID
) -> Detail:
    training = await _managed(requester, training_id)
    await training_service.start_training(session, training)
    runtime = runtime_of(request.app)
    after_commit(session, _kick(runtime))
    return Detail(detail="Training started!")


def _kick(runtime: training_service.TrainingRuntime):  # type: ignore[no-untyped-def]
    async def job() -> None:
        runtime.kick()

    return job


@router.post(
    "/{training_id}/stop/",
    response_model=Detail,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Stop (cancel) a training",
    description="Actor or organisation admin; not in the reference. The training goes to E with the reason; participants "
    'get TRAINING_FINISHED with `state: "E"`. Stored rounds stay downloadable.',
    responses=responses(401, 403, 404, 409),
)
async def stop_training(
    session: SessionDep,
    requester: AuthenticatedRequester,
    request: Request,
    training_id: uuid.UUID,
    data: Annotated[StopRequest | None, Body()] = None,
) -> Detail:
    training = await _managed(requester, training_id)
    reason = (data or StopRequest()).reason
    await training_service.stop_training(session, training, reason)
    after_commit(session, _kick(runtime_of(request.app)))
    return Detail(detail="Training stopped!")


@router.get(
    "/{training_id}/models/",
    response_model=list[ModelRead],
    summary="A training's models",
    description="The global model and every local update of the training the caller may read (the actor, "
    "organisation admins and coaches see all, a participant their own). Empty lists are fine (never 500).",
    responses=responses(401, 403, 404),
)
async def training_models(requester: AuthenticatedRequester, training_id: uuid.UUID) -> list[ModelRead]:
    return await _models(requester, await _readable(requester, training_id), latest=False)


@router.get(
    "/{training_id}/models/latest/",
    response_model=list[ModelRead],
    summary="Latest models of a training",
    description="The global model and the latest local update per client (as far as the caller may read).",
    responses=responses(401, 403, 404),
)
async def training_models_latest(
    requester: AuthenticatedRequester, training_id: uuid.UUID
) -> list[ModelRead]:
    return await _models(requester, await _readable(requester, training_id), latest=True)


async def _models(requester: Requester, training: Training, *, latest: bool) -> list[ModelRead]:
    session = requester.session
    model = await training_service.global_model(session, training.model_id)
    stmt = (
        select(LocalModel)
        .where(LocalModel.base_model_id == model.id, readable(requester, Model))
        .order_by(LocalModel.round, LocalModel.created_at)
    )
    if not (training.actor_id == requester.id or requester.is_superuser or oversees(requester)):
        stmt = stmt.where(LocalModel.owner_id == requester.id)
    rows: list[Model] = list((await session.execute(stmt)).scalars())
    if latest:
        newest: dict[uuid.UUID, LocalModel] = {}
        for row in rows:
            newest[row.owner_id] = row
        rows = list(newest.values())
    return await model_service.describe_many(session, [model, *rows])


@users_router.get(
    "/trainings/",
    response_model=list[TrainingRead],
    summary="My trainings",
    description="Trainings where the caller is actor or participant.",
    responses=responses(401),
)
async def my_trainings(requester: AuthenticatedRequester) -> list[TrainingRead]:
    mine = or_(Training.actor_id == requester.id, Training.id.in_(participations(requester)))
    return await _read_many(requester.session, await _list(requester, mine))


@users_router.get(
    "/myself/notification-key/",
    response_model=NotificationKey,
    summary="My notification signing key",
    description="Notifications to your `message_endpoint` carry `X-FLP-Timestamp` and `X-FLP-Signature: "
    'sha256=<hex>`, the HMAC-SHA256 of `f"{timestamp}.".encode() + body` keyed with this key. Verify it and '
    "reject stale timestamps.",
    responses=responses(401),
)
async def my_notification_key(user: CurrentUser) -> NotificationKey:
    return NotificationKey(key=notify.notification_key(user.id))
