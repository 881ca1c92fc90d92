"""The market (``/api/market/…``): published models across organisations, for buyers to find,
call (``POST /api/inference/``, charged ``inference_api``) and copy
(``POST /api/models/{id}/copy/``). Publishing is ``PUT /api/billing/models/{id}/pricing/``."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Query, Request, Response, status
from fastapi.responses import JSONResponse

from flplatform.auth.dependencies import CurrentUser
from flplatform.billing.idempotency import IdempotencyKeyHeader, idempotent, request_fingerprint
from flplatform.billing.money import to_minor
from flplatform.billing.schemas import OperationRead, PriceIn
from flplatform.db import SessionDep
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Limit, Offset
from flplatform.market import copies, service
from flplatform.market.schemas import MarketModelRead, ModelCopyCreate, ModelCopyRead, ModelPull
from flplatform.orm.training import UncertaintyMethod

router = APIRouter(prefix="/api/market", tags=["market"])
# The copy routes act on a model (``/api/models/{id}/…``); they live here, with the market.
copies_router = APIRouter(prefix="/api/models", tags=["market"])


@router.get(
    "/models/",
    response_model=list[MarketModelRead],
    summary="Models on the market",
    description="Published models of every organisation: name, description, input shape, the uncertainty "
    "methods an inference may ask for, the USD price per inferred sample, whether copies are sold and the "
    "publishing organisation's name. `q` searches name and description; filter by `organization_id`, "
    "`uncertainty_method`, `max_price`, `copyable`; `sort` by `name`, `price` or `published` (`-` for "
    "descending; default newest first). `X-Total-Count` carries the total.",
    responses=responses(401, 422),
)
async def list_models(
    session: SessionDep,
    response: Response,
    _caller: CurrentUser,
    q: Annotated[str | None, Query(max_length=200)] = None,
    organization_id: uuid.UUID | None = None,
    uncertainty_method: UncertaintyMethod | None = None,
    max_price: PriceIn | None = None,
    copyable: bool | None = None,
    sort: service.Sort = "-published",
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[MarketModelRead]:
    cards, total = await service.list_market(
        session,
        q=q,
        organization_id=organization_id,
        method=uncertainty_method,
        max_price=None if max_price is None else to_minor(max_price),
        copyable=copyable,
        sort=sort,
        limit=limit,
        offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [MarketModelRead.model_validate(c) for c in cards]


@router.get(
    "/models/{model_id}/",
    response_model=MarketModelRead,
    summary="One model on the market",
    description="The card of a published model (404 when it is not on the market). Its full metadata "
    "(layers, output shape) is at `GET /api/models/{id}/metadata/`, open to buyers while it is published.",
    responses=responses(401, 404),
)
async def get_model(session: SessionDep, _caller: CurrentUser, model_id: uuid.UUID) -> MarketModelRead:
    return MarketModelRead.model_validate(await service.market_card(session, model_id))


def _copy_read(result: copies.CopyResult) -> ModelCopyRead:
    return ModelCopyRead(
        model_id=result.model.id,
        source_model_id=result.link.source_model_id,
        source_round=result.link.source_round,
        round=result.model.round,
        operations=[OperationRead.model_validate(op) for op in result.operations],
    )


@copies_router.post(
    "/{model_id}/copy/",
    response_model=ModelCopyRead,
    status_code=status.HTTP_201_CREATED,
    summary="Copy a model",
    description="A new global model owned by the caller, in their organisation, from round `round` (default: "
    "the latest) of the source's history. It names the same stored blobs (no bytes are copied). The source's "
    "owner and its organisation's admins may copy it; anyone may when the seller allows copies "
    "(`copy_allowed`), paying `copy_price` to the seller. The price list's `model_copy` (tokens) is charged "
    "(`model_copy`); 402 with nothing written when the payer cannot pay. Send an `Idempotency-Key`.",
    responses=responses(400, 401, 402, 403, 404, 409, 422),
)
async def copy_model(
    request: Request,
    session: SessionDep,
    caller: CurrentUser,
    model_id: uuid.UUID,
    data: ModelCopyCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    async def run() -> tuple[int, ModelCopyRead]:
        key = f"copy:{caller.id}:{idempotency_key}" if idempotency_key else f"copy:{uuid.uuid4()}"
        result = await copies.copy_model(session, caller, model_id, round=data.round, name=data.name, key=key)
        return 201, _copy_read(result)

    return await idempotent(
        session,
        user_id=caller.id,
        key=idempotency_key,
        fingerprint=request_fingerprint("POST", request.url.path, data),
        handler=run,
    )


@copies_router.post(
    "/{model_id}/pull/",
    response_model=ModelCopyRead,
    summary="Update a copy to a newer round of its source",
    description="The copy (`model_id`) takes round `round` (default: the latest) of its source as its next "
    "round, charged `model_copy_update` (once per copy and source round). 409 `copy_up_to_date` when that "
    "round is not newer, `copy_in_training` when the copy backs a training.",
    responses=responses(400, 401, 402, 403, 404, 409, 422),
)
async def pull_copy(
    session: SessionDep, caller: CurrentUser, model_id: uuid.UUID, data: ModelPull
) -> ModelCopyRead:
    return _copy_read(await copies.pull_copy(session, caller, model_id, round=data.round))
