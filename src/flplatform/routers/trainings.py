"""Trainings: create, inspect, manage participants, start, stop, list their models.

Interim permission rules (until the permissions layer routes these endpoints): the actor (the
creator) manages; participants and the actor read; superusers may do everything.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Request, status

from flplatform.auth import CurrentUser
from flplatform.db import SessionDep, after_commit
from flplatform.errors import Forbidden, responses
from flplatform.orm import Training, User
from flplatform.schemas.base import Detail
from flplatform.schemas.model import ModelRead
from flplatform.schemas.training import (
    ClientList,
    NotificationKey,
    StopRequest,
    TrainingCreate,
    TrainingCreated,
    TrainingDetail,
    TrainingRead,
)
from flplatform.services import models as model_service
from flplatform.services import notifications as notify
from flplatform.services import trainings as training_service
from flplatform.services.trainings import runtime_of

router = APIRouter(prefix="/api/trainings", tags=["trainings"])
# GET /api/users/trainings/ (included before the users router so /api/users/{id}/ does not swallow it).
users_router = APIRouter(prefix="/api/users", tags=["trainings"])


async def _read(session: SessionDep, training: Training) -> TrainingRead:
    model = await training_service.global_model(session, training.model_id)
    out = TrainingRead.model_validate(training, from_attributes=True)
    out.participants = sorted(training_service.participant_ids(training), key=str)
    out.round = model.round
    out.mu = (training.options or {}).get("mu")
    return out


def _readable(training: Training, user: User) -> Training:
    if not training_service.can_read_training(training, user):
        raise Forbidden("You are neither the actor nor a participant of this training.")
    return training


def _managed(training: Training, user: User) -> Training:
    if not training_service.is_actor(training, user):
        raise Forbidden("Only the training's actor may do this.")
    return training


def _schedule(request: Request, session: SessionDep, training_id: uuid.UUID) -> None:
    runtime = runtime_of(request.app)
    after_commit(session, lambda: runtime.advance(training_id))


@router.get("/", response_model=list[TrainingRead], summary="List my trainings (as actor)",
            description="Trainings the caller created (actor). `GET /api/users/trainings/` also lists those the "
            "caller participates in.", responses=responses(401))
async def list_trainings(session: SessionDep, user: CurrentUser) -> list[TrainingRead]:
    return [await _read(session, t) for t in await training_service.list_trainings(session, user, as_participant=False)]


@router.post(
    "/",
    response_model=TrainingCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create a training",
    description="The model's owner becomes the actor. `options` is validated (unknown keys → 422): "
    "`daisy_chain_period`, `aggregation_period`, `mu`, `round_deadline_seconds`, `min_quorum`, `straggler_policy`, "
    "`skip_model_tests`, `uncertainty {N, softmax, seed, min_var}`, `aggregator` (+ `aggregator_options`), `dp`. "
    "With `daisy_chain_period` d > 0, `target_num_updates` is multiplied by d (the reference's rule). A model that "
    "already backs a training is cloned. `uncertainty_method=SWAG` needs a `type=SWAG` model.",
    responses=responses(400, 401, 403, 404, 422),
)
async def create_training(session: SessionDep, user: CurrentUser, data: TrainingCreate) -> TrainingCreated:
    training = await training_service.create_training(session, user, data)
    return TrainingCreated(training_id=training.id)


@router.get("/{training_id}/", response_model=TrainingDetail, summary="Get a training",
            description="Actor or participants. `local_models_arrived` counts distinct participants that uploaded "
            "for the CURRENT round (the reference counted all rounds); `round`/`phase` let polling clients follow; "
            "`mu` (FedProx) is included.", responses=responses(401, 403, 404))
async def get_training(session: SessionDep, user: CurrentUser, training_id: uuid.UUID) -> TrainingDetail:
    training = _readable(await training_service.get_training(session, training_id), user)
    base = await _read(session, training)
    members = training_service.participant_ids(training)
    arrived = await training_service.arrivals(session, training.model_id, base.round or 0, members)
    return TrainingDetail(**base.model_dump(), local_models_arrived=len(arrived), local_models_expected=len(members),
                          phase_deadline=training_service.phase_deadline(training))


@router.delete("/{training_id}/", response_model=Detail, summary="Delete a training",
               description="Actor only. The global model stays.", responses=responses(401, 403, 404))
async def delete_training(session: SessionDep, user: CurrentUser, training_id: uuid.UUID) -> Detail:
    training = _managed(await training_service.get_training(session, training_id, lock=True), user)
    await session.delete(training)
    await session.flush()
    return Detail(detail="Training removed!")


@router.put("/{training_id}/clients/", response_model=Detail, status_code=status.HTTP_202_ACCEPTED,
            summary="Register participants",
            description="Actor only (the reference let participants too). `{\"clients\": [user ids]}`. Joining a "
            "running training sends the current phase's notification to the newcomers.",
            responses=responses(400, 401, 403, 404, 422))
async def add_clients(session: SessionDep, user: CurrentUser, request: Request, training_id: uuid.UUID,
                      data: ClientList) -> Detail:
    training = _managed(await training_service.get_training(session, training_id, lock=True), user)
    await training_service.add_participants(session, training, data.clients)
    _schedule(request, session, training.id)
    return Detail(detail="Users registered as participants!")


@router.delete("/{training_id}/clients/", response_model=Detail, summary="Remove participants",
               description="Actor only. Removed clients get CLIENT_REMOVED; the round condition is re-checked "
               "(a removal can complete the round).", responses=responses(400, 401, 403, 404, 422))
async def remove_clients(session: SessionDep, user: CurrentUser, request: Request, training_id: uuid.UUID,
                         data: ClientList) -> Detail:
    training = _managed(await training_service.get_training(session, training_id, lock=True), user)
    await training_service.remove_participants(session, training, data.clients)
    _schedule(request, session, training.id)
    return Detail(detail="Users removed from training participants!")


@router.post("/{training_id}/start/", response_model=Detail, status_code=status.HTTP_202_ACCEPTED,
             summary="Start a training",
             description="Actor only. Needs ≥ 1 participant and state I. Sends TRAINING_START and "
             "UPDATE_ROUND_START to every participant.", responses=responses(400, 401, 403, 404, 402))
async def start_training(session: SessionDep, user: CurrentUser, request: Request, training_id: uuid.UUID) -> Detail:
    training = _managed(await training_service.get_training(session, training_id, lock=True), user)
    await training_service.start_training(session, training)
    runtime = runtime_of(request.app)
    after_commit(session, _kick(runtime))
    return Detail(detail="Training started!")


def _kick(runtime: training_service.TrainingRuntime):  # type: ignore[no-untyped-def]
    async def job() -> None:
        runtime.kick()

    return job


@router.post("/{training_id}/stop/", response_model=Detail, status_code=status.HTTP_202_ACCEPTED,
             summary="Stop (cancel) a training",
             description="Actor only; not in the reference. The training goes to E with the reason; participants "
             "get TRAINING_FINISHED with `state: \"E\"`. Stored rounds stay downloadable.",
             responses=responses(401, 403, 404, 409))
async def stop_training(session: SessionDep, user: CurrentUser, request: Request, training_id: uuid.UUID,
                        data: Annotated[StopRequest | None, Body()] = None) -> Detail:
    training = _managed(await training_service.get_training(session, training_id, lock=True), user)
    reason = (data or StopRequest()).reason
    await training_service.stop_training(session, training, reason)
    after_commit(session, _kick(runtime_of(request.app)))
    return Detail(detail="Training stopped!")


@router.get("/{training_id}/models/", response_model=list[ModelRead], summary="A training's models",
            description="The global model and every local update of the training the caller may read (the actor "
            "sees all, a participant their own). Empty lists are fine (never 500).",
            responses=responses(401, 403, 404))
async def training_models(session: SessionDep, user: CurrentUser, training_id: uuid.UUID) -> list[ModelRead]:
    training = _readable(await training_service.get_training(session, training_id), user)
    return await _models(session, training, user, latest=False)


@router.get("/{training_id}/models/latest/", response_model=list[ModelRead], summary="Latest models of a training",
            description="The global model and the latest local update per client (as far as the caller may read).",
            responses=responses(401, 403, 404))
async def training_models_latest(session: SessionDep, user: CurrentUser, training_id: uuid.UUID) -> list[ModelRead]:
    training = _readable(await training_service.get_training(session, training_id), user)
    return await _models(session, training, user, latest=True)


async def _models(session: SessionDep, training: Training, user: User, *, latest: bool) -> list[ModelRead]:
    from sqlalchemy import select

    from flplatform.orm import LocalModel

    model = await training_service.global_model(session, training.model_id)
    out = [await model_service.describe(session, model)]
    stmt = select(LocalModel).where(LocalModel.base_model_id == model.id).order_by(LocalModel.round, LocalModel.created_at)
    if not training_service.is_actor(training, user):
        stmt = stmt.where(LocalModel.owner_id == user.id)
    rows = list((await session.execute(stmt)).scalars())
    if latest:
        newest: dict[uuid.UUID, LocalModel] = {}
        for row in rows:
            newest[row.owner_id] = row
        rows = list(newest.values())
    out.extend([await model_service.describe(session, r) for r in rows])
    return out


@users_router.get("/trainings/", response_model=list[TrainingRead], summary="My trainings",
                  description="Trainings where the caller is actor or participant.", responses=responses(401))
async def my_trainings(session: SessionDep, user: CurrentUser) -> list[TrainingRead]:
    return [await _read(session, t) for t in await training_service.list_trainings(session, user, as_participant=True)]


@users_router.get(
    "/myself/notification-key/",
    response_model=NotificationKey,
    summary="My notification signing key",
    description="Notifications to your `message_endpoint` carry `X-FLP-Timestamp` and `X-FLP-Signature: "
    "sha256=<hex>`, the HMAC-SHA256 of `f\"{timestamp}.\".encode() + body` keyed with this key. Verify it and "
    "reject stale timestamps.",
    responses=responses(401),
)
async def my_notification_key(user: CurrentUser) -> NotificationKey:
    return NotificationKey(key=notify.notification_key(user.id))
