"""Trainings of many clients: the recorded client selection of each round and the
participants' heartbeats (issue 18). HTTP only: the rules are in
:mod:`flplatform.trainings.selection` and :mod:`flplatform.trainings.liveness`.
"""

from __future__ import annotations

import uuid

from fastapi import Response

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Limit, Offset
from flplatform.trainings import liveness, selection
from flplatform.trainings.dependencies import ReadableTraining
from flplatform.trainings.schemas import HeartbeatRead, RoundSelectionRead

router = APIRouter(prefix="/api/trainings", tags=["trainings"])


@router.get(
    "/{training_id}/rounds/",
    response_model=list[RoundSelectionRead],
    summary="The clients each round asked",
    description="Per round (newest first): the participants selected (`options.clients_per_round`, or "
    "every participant), those that answered (sent an update for the round) and those dropped from it "
    "(offline past `FLP_CLIENT_DROP_AFTER_SECONDS`). Whoever may read the training. "
    "`X-Total-Count` carries the number of rounds.",
    responses=responses(401, 403, 404, 422),
)
async def training_rounds(
    requester: AuthenticatedRequester,
    training: ReadableTraining,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[RoundSelectionRead]:
    rows, total = await selection.rounds_page(requester.session, training, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [RoundSelectionRead.model_validate(r) for r in rows]


@router.post(
    "/{training_id}/heartbeat/",
    response_model=HeartbeatRead,
    summary="A participant's heartbeat",
    description="Participants only. Marks the caller online (see `participant_status` in the training "
    "detail) and answers with the training's state, phase and round and whether the current round "
    "waits for the caller. Send one well within `FLP_CLIENT_OFFLINE_AFTER_SECONDS` (e.g. every 30 s); "
    "a selected client not heard from for `FLP_CLIENT_DROP_AFTER_SECONDS` is dropped from its round. "
    "Clients that never send one are `unknown` and never dropped. Broker backends are heard from "
    "through the broker's ping/pong on the topics they own.",
    responses=responses(401, 403, 404),
)
async def heartbeat(requester: AuthenticatedRequester, training_id: uuid.UUID) -> HeartbeatRead:
    return await liveness.training_heartbeat(requester, training_id)
