"""Trainings: create, inspect, manage participants, start, stop, list their models.

HTTP only: the permission checks are the dependencies ``ReadableTraining``/``ManagedTraining``
(:mod:`flplatform.trainings.dependencies`), the rules and queries the trainings service's.
"""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Body, Header, Query, Request, Response, status
from sse_starlette import EventSourceResponse, ServerSentEvent

from flplatform.auth.dependencies import AuthenticatedRequester, CurrentUser
from flplatform.db import SessionDep
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import MAX_LIMIT, MAX_OFFSET, Detail, Limit, Offset
from flplatform.models.schemas import ModelRead
from flplatform.trainings import event_stream
from flplatform.trainings import notifications as notify
from flplatform.trainings import service as training_service
from flplatform.trainings.dependencies import ManagedTraining, ReadableTraining
from flplatform.trainings.metrics import SeriesFilter, metric_series
from flplatform.trainings.schemas import (
    METRIC_SERIES_EXAMPLE,
    ClientList,
    MetricPoint,
    NotificationKey,
    ParticipantStatus,
    StopRequest,
    TrainingCreate,
    TrainingCreated,
    TrainingDetail,
    TrainingEventRead,
    TrainingRead,
)
from flplatform.trainings.sweeper import advance_after_commit, kick_after_commit, prepare_round_after_commit

router = APIRouter(prefix="/api/trainings", tags=["trainings"])
# GET /api/users/trainings/ (included before the users router so /api/users/{id}/ does not swallow it).
users_router = APIRouter(prefix="/api/users", tags=["trainings"])
MAX_ROUND = 2**31 - 1  # rounds are 32-bit columns
_PAGED = (
    "Oldest first; `limit`/`offset` page them (the default page holds the most a page may) and "
    "`X-Total-Count` carries the total."
)


@router.get(
    "/",
    response_model=list[TrainingRead],
    summary="List the trainings I run or oversee",
    description="Trainings the caller created (actor); for organisation admins and organisation coaches "
    "every training of their organisation; for superusers every training. `GET /api/users/trainings/` "
    "lists those the caller acts in or participates in. Never another organisation's (superusers aside). "
    + _PAGED,
    responses=responses(401, 422),
)
async def list_trainings(
    requester: AuthenticatedRequester, response: Response, limit: Limit = MAX_LIMIT, offset: Offset = 0
) -> list[TrainingRead]:
    rows, total = await training_service.list_run_or_overseen(requester, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return await training_service.describe_many(requester.session, rows)


@router.post(
    "/",
    response_model=TrainingCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create a training",
    description="The model's owner becomes the actor. `options` is validated (unknown keys → 422): "
    "`daisy_chain_period`, `aggregation_period`, `mu`, `round_deadline_seconds`, `min_quorum`, `straggler_policy`, "
    "`skip_model_tests`, `uncertainty {N, softmax, seed, min_var}`, `aggregator` (+ `aggregator_options`), `dp`, "
    "`epochs` (local epochs per round, billed per sample-epoch), `billing_samples_per_update`, `mode` (`async`: "
    "FedBuff asynchronous rounds, options in `fedbuff`; `target_num_updates` then counts global versions). "
    "With `daisy_chain_period` d > 0, `target_num_updates` is multiplied by d (the reference's rule). A model that "
    "already backs a training is cloned. `uncertainty_method=SWAG` needs a `type=SWAG` model. In an "
    "organisation the actor needs a role (admin or coach) there and, for every participant, a role on the "
    "organisation or on a collection the participant is a member of (403 `no_role_for_participant`); "
    "participants must belong to the model's organisation (400).",
    responses=responses(400, 401, 403, 404, 422),
)
async def create_training(requester: AuthenticatedRequester, data: TrainingCreate) -> TrainingCreated:
    training = await training_service.create_training(requester, data)
    return TrainingCreated(training_id=training.id)


@router.get(
    "/{training_id}/",
    response_model=TrainingDetail,
    summary="Get a training",
    description="Actor, participants, organisation admins and organisation coaches. `local_models_arrived` counts distinct participants that uploaded "
    "for the CURRENT round (the reference counted all rounds); `round`/`phase` let polling clients follow; "
    "`mu` (FedProx) is included. `participant_status` lists every participant (username order) unless "
    "`participants_limit` (and `participants_offset`) ask for one page of it: for fleets of thousands of "
    "clients, or use `GET /api/trainings/{training_id}/participants/`.",
    responses=responses(401, 403, 404, 422),
)
async def get_training(
    session: SessionDep,
    training: ReadableTraining,
    participants_limit: Annotated[
        int | None,
        Query(ge=1, le=MAX_LIMIT, description="Page size of `participant_status` (all when absent)."),
    ] = None,
    participants_offset: Annotated[
        int, Query(ge=0, le=MAX_OFFSET, description="Participants to skip in `participant_status`.")
    ] = 0,
) -> TrainingDetail:
    page = None
    if participants_limit is not None or participants_offset:
        page = (MAX_LIMIT if participants_limit is None else participants_limit, participants_offset)
    return await training_service.describe(session, training, status_page=page)


@router.get(
    "/{training_id}/participants/",
    response_model=list[ParticipantStatus],
    summary="A training's participants, paged",
    description="The participants' liveness and selection for the current round (the detail's "
    "`participant_status`), in username order, one page at a time. Same readers as the training. "
    + _PAGED.replace("Oldest first", "Username order"),
    responses=responses(401, 403, 404, 422),
)
async def training_participants(
    session: SessionDep,
    response: Response,
    training: ReadableTraining,
    limit: Limit = MAX_LIMIT,
    offset: Offset = 0,
) -> list[ParticipantStatus]:
    rows, total = await training_service.participants_page(session, training, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return rows


@router.delete(
    "/{training_id}/",
    response_model=Detail,
    summary="Delete a training",
    description="Actor or organisation admin. The global model stays.",
    responses=responses(401, 403, 404),
)
async def delete_training(session: SessionDep, training: ManagedTraining) -> Detail:
    await training_service.delete_training(session, training)
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
    requester: AuthenticatedRequester, request: Request, training: ManagedTraining, data: ClientList
) -> Detail:
    await training_service.add_participants(requester, training, data.clients)
    advance_after_commit(request.app, requester.session, training.id)
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
    session: SessionDep, request: Request, training: ManagedTraining, data: ClientList
) -> Detail:
    await training_service.remove_participants(session, training, data.clients)
    advance_after_commit(request.app, session, training.id)
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
async def start_training(session: SessionDep, request: Request, training: ManagedTraining) -> Detail:
    await training_service.start_training(session, training)
    kick_after_commit(request.app, session)
    prepare_round_after_commit(request.app, session, training.id)
    return Detail(detail="Training started!")


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
    request: Request,
    training: ManagedTraining,
    data: Annotated[StopRequest | None, Body()] = None,
) -> Detail:
    reason = (data or StopRequest()).reason
    await training_service.stop_training(session, training, reason)
    kick_after_commit(request.app, session)
    return Detail(detail="Training stopped!")


@router.get(
    "/{training_id}/models/",
    response_model=list[ModelRead],
    summary="A training's models",
    description="The global model and every local update of the training the caller may read (the actor, "
    "organisation admins and coaches see all, a participant their own). Empty lists are fine (never 500). "
    + _PAGED,
    responses=responses(401, 403, 404, 422),
)
async def training_models(
    requester: AuthenticatedRequester,
    response: Response,
    training: ReadableTraining,
    limit: Limit = MAX_LIMIT,
    offset: Offset = 0,
) -> list[ModelRead]:
    rows, total = await training_service.training_models(
        requester, training, latest=False, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return rows


@router.get(
    "/{training_id}/models/latest/",
    response_model=list[ModelRead],
    summary="Latest models of a training",
    description="The global model and the latest local update per client (as far as the caller may read). "
    + _PAGED,
    responses=responses(401, 403, 404, 422),
)
async def training_models_latest(
    requester: AuthenticatedRequester,
    response: Response,
    training: ReadableTraining,
    limit: Limit = MAX_LIMIT,
    offset: Offset = 0,
) -> list[ModelRead]:
    rows, total = await training_service.training_models(
        requester, training, latest=True, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return rows


EVENTS_EXAMPLE = """\
id: 41
event: update_received
data: {"seq":41,"kind":"update_received","training_id":"7d0c3f52-2f1e-4c43-9f4e-0a43f1d2b8e1","at":"2026-12-04T17:02:11.120000Z","data":{"round":3,"participant_id":"5b6f8a9e-1c2d-4e3f-8a7b-9c0d1e2f3a4b","participant":"hospital-a","sample_size":1200,"replaced":false}}

id: 42
event: aggregation_started
data: {"seq":42,"kind":"aggregation_started","training_id":"7d0c3f52-2f1e-4c43-9f4e-0a43f1d2b8e1","at":"2026-12-04T17:02:11.300000Z","data":{"round":3,"kind":"update","updates":2,"method":"fedavg"}}

id: 43
event: aggregation_finished
data: {"seq":43,"kind":"aggregation_finished","training_id":"7d0c3f52-2f1e-4c43-9f4e-0a43f1d2b8e1","at":"2026-12-04T17:02:11.910000Z","data":{"round":3,"kind":"update","new_round":4,"updates":2,"method":"fedavg","duration_seconds":0.52}}

: ping - 2026-12-04 17:02:26.912000+00:00

"""


def _sse(event: TrainingEventRead) -> ServerSentEvent:
    return ServerSentEvent(
        data=event.model_dump_json(),
        event=event.kind,
        id=None if event.seq is None else str(event.seq),
    )


@router.get(
    "/{training_id}/events/",
    response_class=EventSourceResponse,
    summary="Live events of a training (Server-Sent Events)",
    description="A `text/event-stream` of what happens to the training, as it is committed: "
    "`round_started`, `update_received` (who, sample size), `swag_statistics_received`, "
    "`aggregation_started`, `aggregation_finished` (duration), `test_round_started`, "
    "`test_metrics_received`, `state_changed`, `participant_removed`, `error`. Each event's `id:` is "
    "its number in the training (1, 2, 3, …) and its `data:` a JSON `TrainingEventRead`. The stream "
    "first replays the recorded events after `Last-Event-ID` (the header an `EventSource` sends when it "
    "reconnects; `?last_event_id=` for a first connection), then stays open (a `: ping` comment every "
    "15 s). Only the newest `FLP_TRAINING_EVENTS_KEEP` events per training are kept: when some that "
    "the caller missed are gone, a `gap` event (no id) says which. Works with several worker processes "
    "on PostgreSQL. Same permission as reading the training (404 for another organisation's).",
    responses={
        200: {
            "description": "The event stream",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": EVENTS_EXAMPLE}},
        },
        **responses(401, 403, 404, 422),
    },
)
async def training_events(
    request: Request,
    training: ReadableTraining,
    last_event_id_header: Annotated[
        int | None,
        Header(alias="Last-Event-ID", ge=0, description="Replay the events after this one (reconnects)"),
    ] = None,
    last_event_id: Annotated[
        int | None, Query(ge=0, description="Replay the events after this one (first connection)")
    ] = None,
) -> EventSourceResponse:
    settings = request.app.state.settings
    after = last_event_id_header if last_event_id_header is not None else last_event_id or 0
    shutdown = anyio.Event()  # set by sse-starlette when the server shuts down: the stream ends cleanly
    events = event_stream.stream(
        request.app.state.sessionmaker,
        training.id,
        after=after,
        poll_seconds=settings.training_events_poll_seconds,
        stop=shutdown,
    )
    return EventSourceResponse(
        (_sse(event) async for event in events),
        ping=settings.training_events_ping_seconds,
        shutdown_event=shutdown,
        shutdown_grace_period=2.0,
    )


@router.get(
    "/{training_id}/metrics/",
    response_model=dict[str, list[MetricPoint]],
    summary="A training's metrics per round",
    description="`{name: [points]}` for plots over rounds: per round and source one aggregate (`reporter` null) "
    "then the participants' points. `source=update`: sent with the update of that round, aggregated as the mean "
    "weighted by the updates' `sample_size`; `source=test`: reported on the global model of that round in a test "
    "round, aggregated as the plain mean (no sample size is reported with them). Only metrics the caller may "
    "read count (metrics follow their model's permissions), aggregates included. Filters: "
    "repeated `name`, `round_from`/`round_to` (inclusive). Non-numeric values are left out.",
    responses={
        200: {"content": {"application/json": {"example": METRIC_SERIES_EXAMPLE}}},
        **responses(401, 403, 404, 422),
    },
)
async def training_metrics(
    requester: AuthenticatedRequester,
    training: ReadableTraining,
    name: Annotated[
        list[str], Query(max_length=50, description="Metric names (repeat); all when absent.")
    ] = [],  # noqa: B006
    round_from: Annotated[int | None, Query(ge=0, le=MAX_ROUND)] = None,
    round_to: Annotated[int | None, Query(ge=0, le=MAX_ROUND)] = None,
) -> dict[str, list[MetricPoint]]:
    return await metric_series(requester, training, SeriesFilter(name, round_from, round_to))


@users_router.get(
    "/trainings/",
    response_model=list[TrainingRead],
    summary="My trainings",
    description="Trainings where the caller is actor or participant. " + _PAGED,
    responses=responses(401, 422),
)
async def my_trainings(
    requester: AuthenticatedRequester, response: Response, limit: Limit = MAX_LIMIT, offset: Offset = 0
) -> list[TrainingRead]:
    rows, total = await training_service.list_mine(requester, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return await training_service.describe_many(requester.session, rows)


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
