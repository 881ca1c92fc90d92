"""Billing routes for money and models: balances, top-ups and the payment webhook, payouts,
conversions, coupons, the operation history and refunds, per-model reports and market pricing.
Statements, bills, the price list and reconciliation are in ``routers.billing_ledger``.

A user sees their own money; superusers see and manage everyone's (``billing.dependencies``).
Charging POSTs accept an ``Idempotency-Key`` header.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Annotated

from fastapi import Header, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from flplatform import billing
from flplatform.auth.credentials import sign
from flplatform.auth.dependencies import CurrentUser, SuperUser
from flplatform.billing import ledger
from flplatform.billing.dependencies import (
    BillableUserId,
    ManagedModel,
    MarketModel,
    OperationQuery,
    VisibleOperation,
)
from flplatform.billing.idempotency import IdempotencyKeyHeader, idempotent, request_fingerprint
from flplatform.billing.money import to_decimal, to_minor
from flplatform.billing.reports import model_earnings_page, month_bounds
from flplatform.billing.schemas import (
    BalanceRead,
    ConversionCreate,
    CouponCreate,
    CouponRead,
    CouponRedeem,
    EarningsLine,
    ModelPricingRead,
    ModelPricingUpdate,
    ModelReport,
    OperationDetail,
    OperationRead,
    PaymentEvent,
    PayoutCreate,
    PostingRead,
    RefundCreate,
    TopUpCreate,
)
from flplatform.db import SessionDep
from flplatform.errors import Unauthorized, Unprocessable, responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import PERIOD_PATTERN, Limit, Offset, SafeDateTime
from flplatform.organizations.service import get_collection
from flplatform.orm.organizations import CollectionKind
from flplatform.users.service import get_user

router = APIRouter(prefix="/api/billing", tags=["billing"])


def _op(op: object) -> OperationRead:
    return OperationRead.model_validate(op)


async def _recipient(
    session: SessionDep, user_id: uuid.UUID | None, organization_id: uuid.UUID | None
) -> None:
    """Exactly one existing user or organisation (422 / 404 otherwise)."""
    if (user_id is None) == (organization_id is None):
        raise Unprocessable("Give exactly one of user_id and organization_id.")
    if user_id is not None:
        await get_user(session, user_id)
    else:
        await get_collection(session, organization_id, CollectionKind.ORGANIZATION)  # type: ignore[arg-type]


@router.get(
    "/balance/",
    response_model=BalanceRead,
    summary="Balances per currency",
    description="Available and held (reserved for running training rounds) balances in USD, TOKEN and "
    "COUPON. Superusers may pass `user_id`.",
    responses=responses(401, 403),
)
async def get_balance(session: SessionDep, target: BillableUserId) -> BalanceRead:
    return BalanceRead.model_validate(
        {"user_id": target, "balances": await billing.balances(session, target)}
    )


@router.post(
    "/top-ups/",
    response_model=OperationRead,
    status_code=status.HTTP_201_CREATED,
    summary="Top up a balance (admin)",
    description="Credits a user's (`user_id`) or an organisation's (`organization_id`) USD or TOKEN "
    "balance from the platform's external-payments account. Send an `Idempotency-Key` so a retry does "
    "not credit twice.",
    responses=responses(400, 401, 403, 404, 422),
)
async def create_top_up(
    request: Request,
    session: SessionDep,
    admin: SuperUser,
    data: TopUpCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    await _recipient(session, data.user_id, data.organization_id)

    async def run() -> tuple[int, OperationRead]:
        op = await billing.top_up(
            session,
            user_id=data.user_id,
            organization_id=data.organization_id,
            amount=to_minor(data.amount),
            currency=data.currency,
            key=f"topup:{admin.id}:{idempotency_key}" if idempotency_key else f"topup:{uuid.uuid4()}",
            actor_id=admin.id,
            description=data.description,
        )
        return 201, _op(op)

    return await idempotent(
        session,
        user_id=admin.id,
        key=idempotency_key,
        fingerprint=request_fingerprint("POST", request.url.path, data),
        handler=run,
    )


@router.post(
    "/webhooks/payments/",
    response_model=OperationRead,
    summary="Payment provider webhook",
    description="A payment provider reports money received. The raw body must be signed: header "
    "`X-Signature` = hex HMAC-SHA256 of the body with the server secret. The event's `external_id` is "
    "the idempotency key: a re-delivered event returns the first operation and credits nothing; the same "
    "`external_id` with a different body is a 409.",
    responses=responses(400, 401, 404, 409, 422),
)
async def payment_webhook(
    request: Request,
    session: SessionDep,
    x_signature: Annotated[str | None, Header(alias="X-Signature")] = None,
) -> OperationRead:
    body = await request.body()
    if not x_signature or not hmac.compare_digest(x_signature, sign(body)):
        raise Unauthorized("Missing or invalid X-Signature.", code="invalid_signature", headers={})
    try:
        event = PaymentEvent.model_validate_json(body)
    except ValidationError as exc:
        raise Unprocessable(f"Invalid payment event: {exc.errors()[0]['msg']}") from None
    await _recipient(session, event.user_id, event.organization_id)
    op = await billing.top_up(
        session,
        user_id=event.user_id,
        organization_id=event.organization_id,
        amount=to_minor(event.amount),
        currency=event.currency,
        key=f"payment:{event.external_id}",
        description=f"payment {event.external_id}",
    )
    return _op(op)


@router.post(
    "/payouts/",
    response_model=OperationRead,
    status_code=status.HTTP_201_CREATED,
    summary="Pay out a user's earnings (admin)",
    description="Moves USD from a user's balance to the platform's market-payouts account (the money "
    "leaves the platform). 402 if the balance is too low.",
    responses=responses(401, 402, 403, 404, 422),
)
async def create_payout(
    request: Request,
    session: SessionDep,
    admin: SuperUser,
    data: PayoutCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    await get_user(session, data.user_id)

    async def run() -> tuple[int, OperationRead]:
        key = f"payout:{admin.id}:{idempotency_key}" if idempotency_key else f"payout:{uuid.uuid4()}"
        op = await billing.payout(
            session, user_id=data.user_id, amount=to_minor(data.amount), key=key, actor_id=admin.id
        )
        return 201, _op(op)

    return await idempotent(
        session,
        user_id=admin.id,
        key=idempotency_key,
        fingerprint=request_fingerprint("POST", request.url.path, data),
        handler=run,
    )


@router.post(
    "/conversions/",
    response_model=OperationRead,
    status_code=status.HTTP_201_CREATED,
    summary="Convert USD into tokens",
    description="Spends USD (not coupons) for TOKEN at the price list's `token_per_usd`. 402 if the USD "
    "balance is too low. Send an `Idempotency-Key`.",
    responses=responses(401, 402, 422),
)
async def create_conversion(
    request: Request,
    session: SessionDep,
    caller: CurrentUser,
    data: ConversionCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    async def run() -> tuple[int, OperationRead]:
        key = f"conversion:{caller.id}:{idempotency_key}" if idempotency_key else f"conversion:{uuid.uuid4()}"
        op = await billing.convert_to_tokens(
            session, user_id=caller.id, usd_amount=to_minor(data.usd_amount), key=key
        )
        return 201, _op(op)

    return await idempotent(
        session,
        user_id=caller.id,
        key=idempotency_key,
        fingerprint=request_fingerprint("POST", request.url.path, data),
        handler=run,
    )


@router.post(
    "/coupons/",
    response_model=CouponRead,
    status_code=status.HTTP_201_CREATED,
    summary="Create a coupon (admin)",
    description="Each redemption credits `amount` of COUPON balance, spent before USD on usage.",
    responses=responses(401, 403, 409, 422),
)
async def create_coupon(session: SessionDep, admin: SuperUser, data: CouponCreate) -> CouponRead:
    coupon = await billing.create_coupon(
        session,
        code=data.code,
        amount=to_minor(data.amount),
        max_redemptions=data.max_redemptions,
        expires_at=data.expires_at,
        created_by=admin.id,
    )
    return CouponRead.model_validate(coupon)


@router.get(
    "/coupons/",
    response_model=list[CouponRead],
    summary="List coupons (admin)",
    description="Newest first. `X-Total-Count` carries the total.",
    responses=responses(401, 403, 422),
)
async def list_coupons(
    session: SessionDep, response: Response, _admin: SuperUser, limit: Limit = 100, offset: Offset = 0
) -> list[CouponRead]:
    rows, total = await billing.list_coupons(session, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [CouponRead.model_validate(c) for c in rows]


@router.post(
    "/coupons/redeem/",
    response_model=OperationRead,
    summary="Redeem a coupon",
    description="Once per user and coupon; redeeming again returns the first operation. 404 for an "
    "unknown code, 409 when expired or fully redeemed.",
    responses=responses(401, 404, 409, 422),
)
async def redeem_coupon(session: SessionDep, caller: CurrentUser, data: CouponRedeem) -> OperationRead:
    return _op(await billing.redeem_coupon(session, user_id=caller.id, code=data.code))


@router.get(
    "/operations/",
    response_model=list[OperationRead],
    summary="Operation history",
    description="Operations where the user paid, acted or owned the model, newest first; filter by "
    "kind, model and time (`since` inclusive, `until` exclusive). `X-Total-Count` carries the total. "
    "Superusers may pass `user_id`, or `all=true` for everyone's.",
    responses=responses(401, 403, 422),
)
async def list_operations(
    session: SessionDep, response: Response, query: OperationQuery
) -> list[OperationRead]:
    rows, total = await billing.list_operations(
        session,
        user_id=query.user_id,
        kind=query.kind,
        model_id=query.model_id,
        since=query.since,
        until=query.until,
        limit=query.limit,
        offset=query.offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [_op(r) for r in rows]


@router.get(
    "/operations/{operation_id}/",
    response_model=OperationDetail,
    summary="One operation with its postings",
    description="Both (all) legs of the journal entry behind the operation.",
    responses=responses(401, 404),
)
async def get_operation(session: SessionDep, op: VisibleOperation) -> OperationDetail:
    postings = [
        PostingRead.model_validate({"account": k, "amount": a})
        for k, a in await ledger.postings_of(session, op.entry_id)
    ]
    return OperationDetail.model_validate({**_op(op).model_dump(), "postings": postings})


@router.post(
    "/operations/{operation_id}/refund/",
    response_model=OperationRead,
    status_code=status.HTTP_201_CREATED,
    summary="Refund an operation (admin)",
    description="Writes a reversing entry (the original stays as it was); at most once per operation. "
    "402 if a recipient no longer has the money.",
    responses=responses(400, 401, 402, 403, 404, 409),
)
async def refund_operation(
    request: Request,
    session: SessionDep,
    admin: SuperUser,
    operation_id: uuid.UUID,
    data: RefundCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    async def run() -> tuple[int, OperationRead]:
        op = await billing.refund(session, operation_id=operation_id, actor_id=admin.id, reason=data.reason)
        return 201, _op(op)

    return await idempotent(
        session,
        user_id=admin.id,
        key=idempotency_key,
        fingerprint=request_fingerprint("POST", request.url.path, data),
        handler=run,
    )


@router.get(
    "/models/{model_id}/report/",
    response_model=ModelReport,
    summary="Billing report of a model",
    description="Seed 004's per-machine summary: training cost, inference cost and API (market) income, "
    "net of refunds. For the model's owner and superusers.",
    responses=responses(401, 404),
)
async def model_report(session: SessionDep, model: ManagedModel) -> ModelReport:
    return ModelReport.model_validate(await billing.model_report(session, model.id))


@router.get(
    "/earnings/",
    response_model=list[EarningsLine],
    summary="Market earnings per model (personal)",
    description="What the caller's own models outside any organisation earned on the market (paid inference "
    "and copies, net of refunds) per model and currency, for `period` (`YYYY-MM`) or between `since` and "
    "`until`. An organisation's models earn for the organisation: `/api/organizations/{id}/billing/earnings/`. "
    "Superusers may pass `user_id`. By model, then currency; `limit`/`offset` page the lines and "
    "`X-Total-Count` carries the total.",
    responses=responses(400, 401, 403, 422),
)
async def get_earnings(
    session: SessionDep,
    response: Response,
    target: BillableUserId,
    period: Annotated[str | None, Query(pattern=PERIOD_PATTERN, examples=["2026-11"])] = None,
    model_id: uuid.UUID | None = None,
    since: SafeDateTime | None = None,
    until: SafeDateTime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[EarningsLine]:
    if period is not None:
        since, until = month_bounds(period)
    rows, total = await model_earnings_page(
        session, owner_id=target, model_id=model_id, since=since, until=until, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return [EarningsLine.model_validate(r) for r in rows]


def _pricing_read(model_id: uuid.UUID, row: object | None) -> ModelPricingRead:
    if row is None:
        return ModelPricingRead(
            model_id=model_id, inference_public=False, inference_price_per_sample=to_decimal(0)
        )
    return ModelPricingRead.model_validate(row)


@router.get(
    "/models/{model_id}/pricing/",
    response_model=ModelPricingRead,
    summary="Market pricing of a model",
    description="Whether other users may run inference on the model and what they pay per sample. For those "
    "who may read the model, and for everyone once it is public on the market; 404 otherwise.",
    responses=responses(401, 404),
)
async def get_model_pricing(session: SessionDep, model: MarketModel) -> ModelPricingRead:
    return _pricing_read(model.id, await billing.model_pricing(session, model.id))


@router.put(
    "/models/{model_id}/pricing/",
    response_model=ModelPricingRead,
    summary="Publish a model on the inference market",
    description="The owner (or an admin of the model's organisation) publishes the model on the market "
    "(`GET /api/market/models/`) or withdraws it, with its USD price per inferred sample, and whether other "
    "organisations may copy it at `copy_price`. The seller (the model's organisation, else its owner) "
    "receives the prices minus the platform fee (`market_fee_bps`).",
    responses=responses(401, 404, 422),
)
async def put_model_pricing(
    session: SessionDep, model: ManagedModel, data: ModelPricingUpdate
) -> ModelPricingRead:
    row = await billing.set_model_pricing(
        session,
        model.id,
        public=data.inference_public,
        price_per_sample=to_minor(data.inference_price_per_sample),
        copy_allowed=data.copy_allowed,
        copy_price=None if data.copy_price is None else to_minor(data.copy_price),
    )
    return _pricing_read(model.id, row)
