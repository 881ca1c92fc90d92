"""Billing routes: balances, top-ups and the payment webhook, coupons, conversions, operation
history, per-model reports, statements and bills, the price list, reconciliation, audit log.

A user sees their own money; superusers see and manage everyone's. Charging POSTs accept an
``Idempotency-Key`` header.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import func, select

from flplatform.auth.credentials import sign
from flplatform.auth.dependencies import CurrentUser, SuperUser
from flplatform.billing import ledger
from flplatform.billing import service as billing
from flplatform.billing.idempotency import idempotent, request_fingerprint
from flplatform.billing.money import to_decimal, to_minor
from flplatform.billing.prices import get_prices, set_price
from flplatform.billing.schemas import (
    AuditRead,
    BalanceRead,
    BillCreate,
    BillRead,
    ConversionCreate,
    CouponCreate,
    CouponRead,
    CouponRedeem,
    ModelPricingRead,
    ModelPricingUpdate,
    ModelReport,
    OperationDetail,
    OperationRead,
    PaymentEvent,
    PayoutCreate,
    PostingRead,
    PriceRead,
    PriceUpdate,
    ReconciliationRead,
    RefundCreate,
    StatementRead,
    TopUpCreate,
)
from flplatform.db import SessionDep
from flplatform.errors import Forbidden, NotFound, Unauthorized, Unprocessable, responses
from flplatform.kit.schemas import PERIOD_PATTERN, Limit, Offset, SafeDateTime
from flplatform.orm import Model, User
from flplatform.orm.audit import AuditLevel, AuditLog
from flplatform.orm.billing import Bill, Coupon, OperationKind

router = APIRouter(prefix="/api/billing", tags=["billing"])
audit_router = APIRouter(prefix="/api/audit-log", tags=["audit"])

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Any unique string (a UUID4 is best). Retrying with the same key replays the first "
        "response instead of charging again; reusing it for a different request is a 422.",
        max_length=255,
    ),
]


def _target_user(caller: User, user_id: uuid.UUID | None) -> uuid.UUID:
    """Whose billing data a request may see: one's own, anyone's for superusers."""
    if user_id is None or user_id == caller.id:
        return caller.id
    if not caller.is_superuser:
        raise Forbidden("You may only see your own billing data.")
    return user_id


async def _existing_user(session: SessionDep, user_id: uuid.UUID) -> None:
    if await session.get(User, user_id) is None:
        raise NotFound(f"User {user_id} not found.")


def _op(op: object) -> OperationRead:
    return OperationRead.model_validate(op)


@router.get(
    "/balance/",
    response_model=BalanceRead,
    summary="Balances per currency",
    description="Available and held (reserved for running training rounds) balances in USD, TOKEN and "
    "COUPON. Superusers may pass `user_id`.",
    responses=responses(401, 403),
)
async def get_balance(
    session: SessionDep, caller: CurrentUser, user_id: uuid.UUID | None = None
) -> BalanceRead:
    target = _target_user(caller, user_id)
    return BalanceRead.model_validate(
        {"user_id": target, "balances": await billing.balances(session, target)}
    )


@router.post(
    "/top-ups/",
    response_model=OperationRead,
    status_code=status.HTTP_201_CREATED,
    summary="Top up a balance (admin)",
    description="Credits a user's USD or TOKEN balance from the platform's external-payments account. "
    "Send an `Idempotency-Key` so a retry does not credit twice.",
    responses=responses(400, 401, 403, 404, 422),
)
async def create_top_up(
    request: Request,
    session: SessionDep,
    admin: SuperUser,
    data: TopUpCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    await _existing_user(session, data.user_id)

    async def run() -> tuple[int, OperationRead]:
        op = await billing.top_up(
            session,
            user_id=data.user_id,
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
    await _existing_user(session, event.user_id)
    op = await billing.top_up(
        session,
        user_id=event.user_id,
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
    await _existing_user(session, data.user_id)

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
    responses=responses(401, 403),
)
async def list_coupons(session: SessionDep, _admin: SuperUser) -> list[CouponRead]:
    rows = (await session.execute(select(Coupon).order_by(Coupon.created_at.desc()))).scalars().all()
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
    session: SessionDep,
    response: Response,
    caller: CurrentUser,
    user_id: uuid.UUID | None = None,
    all: bool = False,
    kind: OperationKind | None = None,
    model_id: uuid.UUID | None = None,
    since: SafeDateTime | None = None,
    until: SafeDateTime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[OperationRead]:
    if all and not caller.is_superuser:
        raise Forbidden("Only superusers may list everyone's operations.")
    target = None if all else _target_user(caller, user_id)
    rows, total = await billing.list_operations(
        session,
        user_id=target,
        kind=kind,
        model_id=model_id,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [_op(r) for r in rows]


async def _visible_operation(session: SessionDep, caller: User, operation_id: uuid.UUID):  # type: ignore[no-untyped-def]
    op = await billing.get_operation(session, operation_id)
    if not caller.is_superuser and caller.id not in (op.payer_id, op.actor_id, op.model_owner_id):
        raise NotFound(f"Operation {operation_id} not found.")
    return op


@router.get(
    "/operations/{operation_id}/",
    response_model=OperationDetail,
    summary="One operation with its postings",
    description="Both (all) legs of the journal entry behind the operation.",
    responses=responses(401, 404),
)
async def get_operation(session: SessionDep, caller: CurrentUser, operation_id: uuid.UUID) -> OperationDetail:
    op = await _visible_operation(session, caller, operation_id)
    postings = [PostingRead(account=k, amount=a) for k, a in await ledger.postings_of(session, op.entry_id)]
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


async def _owned_model(session: SessionDep, caller: User, model_id: uuid.UUID) -> Model:
    model = await session.get(Model, model_id)
    if model is None or (model.owner_id != caller.id and not caller.is_superuser):
        raise NotFound(f"Model {model_id} not found.")
    return model


@router.get(
    "/models/{model_id}/report/",
    response_model=ModelReport,
    summary="Billing report of a model",
    description="Seed 004's per-machine summary: training cost, inference cost and API (market) income, "
    "net of refunds. For the model's owner and superusers.",
    responses=responses(401, 404),
)
async def model_report(session: SessionDep, caller: CurrentUser, model_id: uuid.UUID) -> ModelReport:
    await _owned_model(session, caller, model_id)
    return ModelReport.model_validate(await billing.model_report(session, model_id))


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
async def get_model_pricing(
    session: SessionDep, caller: CurrentUser, model_id: uuid.UUID
) -> ModelPricingRead:
    from flplatform.permissions import Requester, can_read

    model = await session.get(Model, model_id)
    pricing = await billing.model_pricing(session, model_id)
    # Visible to whoever may read the model, and to everyone once the owner published it on the
    # inference market (the one deliberate exposure across organisations); 404 otherwise.
    published = pricing is not None and pricing.inference_public
    if model is None or not (published or await can_read(await Requester.load(session, caller), model)):
        raise NotFound(f"Model {model_id} not found.")
    return _pricing_read(model_id, pricing)


@router.put(
    "/models/{model_id}/pricing/",
    response_model=ModelPricingRead,
    summary="Publish a model on the inference market",
    description="The owner sets whether the model is public for inference and its USD price per sample; "
    "the owner receives the price minus the platform fee (`market_fee_bps`).",
    responses=responses(401, 404, 422),
)
async def put_model_pricing(
    session: SessionDep, caller: CurrentUser, model_id: uuid.UUID, data: ModelPricingUpdate
) -> ModelPricingRead:
    await _owned_model(session, caller, model_id)
    row = await billing.set_model_pricing(
        session,
        model_id,
        public=data.inference_public,
        price_per_sample=to_minor(data.inference_price_per_sample),
    )
    return _pricing_read(model_id, row)


@router.get(
    "/statements/{period}/",
    response_model=StatementRead,
    summary="Monthly statement",
    description="For `period` = `YYYY-MM` (UTC): opening and closing balance per currency, money in and "
    "out, operations by kind, and the month's bills. Superusers may pass `user_id`. Months from 1970-01 "
    "to 2999-12.",
    responses=responses(400, 401, 403, 422),
)
async def get_statement(
    session: SessionDep,
    caller: CurrentUser,
    period: Annotated[str, Path(pattern=PERIOD_PATTERN, examples=["2026-11"])],
    user_id: uuid.UUID | None = None,
) -> StatementRead:
    target = _target_user(caller, user_id)
    return StatementRead.model_validate(await billing.statement(session, target, period))


@router.post(
    "/bills/",
    response_model=BillRead,
    status_code=status.HTTP_201_CREATED,
    summary="Issue a bill (admin)",
    responses=responses(401, 403, 404, 422),
)
async def create_bill(session: SessionDep, admin: SuperUser, data: BillCreate) -> BillRead:
    await _existing_user(session, data.user_id)
    bill = await billing.create_bill(
        session,
        user_id=data.user_id,
        amount=to_minor(data.amount),
        description=data.description,
        period=data.period,
        created_by=admin.id,
    )
    return BillRead.model_validate(bill)


@router.get(
    "/bills/",
    response_model=list[BillRead],
    summary="List bills",
    description="The caller's bills (superusers: `user_id`'s), newest first.",
    responses=responses(401, 403),
)
async def list_bills(
    session: SessionDep, caller: CurrentUser, user_id: uuid.UUID | None = None
) -> list[BillRead]:
    target = _target_user(caller, user_id)
    rows = (
        await session.execute(select(Bill).where(Bill.user_id == target).order_by(Bill.created_at.desc()))
    ).scalars()
    return [BillRead.model_validate(b) for b in rows]


@router.post(
    "/bills/{bill_id}/pay/",
    response_model=BillRead,
    summary="Pay a bill",
    description="Pays the bill from the USD balance (coupons are not accepted). Paying a paid bill "
    "returns it unchanged. 402 if the balance is too low.",
    responses=responses(401, 402, 404, 422),
)
async def pay_bill(
    request: Request,
    session: SessionDep,
    caller: CurrentUser,
    bill_id: uuid.UUID,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    bill = await billing.get_bill(session, bill_id)
    if bill.user_id != caller.id and not caller.is_superuser:
        raise NotFound(f"Bill {bill_id} not found.")

    async def run() -> tuple[int, BillRead]:
        await billing.pay_bill(session, bill, actor_id=caller.id)
        return 200, BillRead.model_validate(bill)

    return await idempotent(
        session,
        user_id=caller.id,
        key=idempotency_key,
        fingerprint=request_fingerprint("POST", request.url.path, None),
        handler=run,
    )


@router.get(
    "/prices/",
    response_model=list[PriceRead],
    summary="Price list",
    description="What each metered action costs (defaults, overridden by administrators).",
    responses=responses(401),
)
async def list_prices(session: SessionDep, _caller: CurrentUser) -> list[PriceRead]:
    prices = await get_prices(session)
    return [
        PriceRead(
            item=p.item,
            amount=to_decimal(p.amount) if p.currency else p.amount,
            currency=p.currency,
            description=p.description,
        )
        for p in prices.items.values()
    ]


@router.put(
    "/prices/{item}/",
    response_model=PriceRead,
    summary="Set a price (admin)",
    description="Money items take a decimal amount of their currency; `market_fee_bps` and "
    "`token_per_usd` take an integer. Running training rounds keep the price they were reserved at.",
    responses=responses(401, 403, 404, 422),
)
async def put_price(session: SessionDep, admin: SuperUser, item: str, data: PriceUpdate) -> PriceRead:
    from flplatform.billing.audit import record
    from flplatform.billing.prices import DEFAULTS

    default = DEFAULTS.get(item)
    if default is None:
        raise NotFound(f"No price item {item!r}; known items: {', '.join(DEFAULTS)}.")
    if default.currency is None and data.amount != data.amount.to_integral_value():
        raise Unprocessable(f"{item} is an integer.")
    amount = to_minor(data.amount) if default.currency else int(data.amount)
    price = await set_price(session, item, amount, by=admin.id)
    await record(session, "billing.price_set", f"{item} = {data.amount}", actor=admin)
    return PriceRead(
        item=item,
        amount=to_decimal(amount) if price.currency else amount,
        currency=price.currency,
        description=price.description,
    )


@router.get(
    "/reconciliation/",
    response_model=ReconciliationRead,
    summary="Reconcile the ledger (admin)",
    description="Checks that cached balances equal the sum of their postings, every entry and the whole "
    "ledger sum to zero per currency, and held balances equal the open holds. `ok` is true when all hold.",
    responses=responses(401, 403),
)
async def reconciliation(session: SessionDep, _admin: SuperUser) -> ReconciliationRead:
    return ReconciliationRead.model_validate(await ledger.reconcile(session))


@audit_router.get(
    "/",
    response_model=list[AuditRead],
    summary="Audit log (admin)",
    description="Billing operations, price changes, token creation/revocation, failed logins and "
    "permission changes, newest first. `X-Total-Count` carries the total.",
    responses=responses(401, 403, 422),
)
async def list_audit(
    session: SessionDep,
    response: Response,
    _admin: SuperUser,
    action: str | None = None,
    level: AuditLevel | None = None,
    actor_id: uuid.UUID | None = None,
    organisation_id: uuid.UUID | None = None,
    since: SafeDateTime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[AuditRead]:
    conditions = []
    if action is not None:
        conditions.append(AuditLog.action.startswith(action, autoescape=True))
    if level is not None:
        conditions.append(AuditLog.level == level)
    if actor_id is not None:
        conditions.append(AuditLog.actor_id == actor_id)
    if organisation_id is not None:
        conditions.append(AuditLog.organisation_id == organisation_id)
    if since is not None:
        conditions.append(AuditLog.timestamp >= since)
    total = (
        await session.execute(select(func.count()).select_from(AuditLog).where(*conditions))
    ).scalar_one()
    rows = (
        await session.execute(
            select(AuditLog)
            .where(*conditions)
            .order_by(AuditLog.timestamp.desc(), AuditLog.id)
            .limit(limit)
            .offset(offset)
        )
    ).scalars()
    response.headers["X-Total-Count"] = str(total)
    return [AuditRead.model_validate(r) for r in rows]
