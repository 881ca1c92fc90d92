"""Billing routes for the ledger's periods and administration: monthly statements, bills, the
price list and reconciliation (the same ``/api/billing`` prefix and tag as ``routers.billing``)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated

from fastapi import Path, Request, Response, status
from fastapi.responses import JSONResponse

from flplatform import billing
from flplatform.auth.dependencies import CurrentUser, SuperUser
from flplatform.billing import ledger
from flplatform.billing.dependencies import BillableUserId, OwnBill
from flplatform.billing.idempotency import IdempotencyKeyHeader, idempotent, request_fingerprint
from flplatform.billing.money import to_decimal, to_minor
from flplatform.billing.prices import change_price, get_prices
from flplatform.billing.schemas import (
    BillCreate,
    BillRead,
    PriceRead,
    PriceUpdate,
    ReconciliationRead,
    StatementRead,
)
from flplatform.db import SessionDep
from flplatform.errors import Unprocessable, responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import PERIOD_PATTERN, Limit, Offset
from flplatform.organizations.service import get_collection
from flplatform.orm.base import utcnow
from flplatform.orm.billing import BillStatus
from flplatform.orm.organizations import CollectionKind
from flplatform.users.service import get_user

router = APIRouter(prefix="/api/billing", tags=["billing"])


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
    period: Annotated[str, Path(pattern=PERIOD_PATTERN, examples=["2026-11"])],
    target: BillableUserId,
) -> StatementRead:
    return StatementRead.model_validate(await billing.statement(session, target, period))


@router.post(
    "/bills/",
    response_model=BillRead,
    status_code=status.HTTP_201_CREATED,
    summary="Issue a bill (admin)",
    responses=responses(401, 403, 404, 422),
)
async def create_bill(session: SessionDep, request: Request, admin: SuperUser, data: BillCreate) -> BillRead:
    if (data.user_id is None) == (data.organization_id is None):
        raise Unprocessable("Give exactly one of user_id and organization_id.")
    if data.user_id is not None:
        await get_user(session, data.user_id)
    else:
        await get_collection(session, data.organization_id, CollectionKind.ORGANIZATION)  # type: ignore[arg-type]
    bill = await billing.create_bill(
        session,
        user_id=data.user_id,
        organization_id=data.organization_id,
        amount=to_minor(data.amount),
        description=data.description,
        period=data.period,
        created_by=admin.id,
        due_at=data.due_at or utcnow() + dt.timedelta(days=request.app.state.settings.bill_due_days),
    )
    return BillRead.model_validate(bill)


@router.get(
    "/bills/",
    response_model=list[BillRead],
    summary="List bills",
    description="The caller's bills (superusers: `user_id`'s), newest first; `status` filters. An "
    "organisation's bills are at `/api/organizations/{id}/billing/bills/`. `X-Total-Count` carries the total.",
    responses=responses(401, 403, 422),
)
async def list_bills(
    session: SessionDep,
    response: Response,
    target: BillableUserId,
    status: BillStatus | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[BillRead]:
    rows, total = await billing.list_bills(session, target, status=status, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
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
    bill: OwnBill,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:

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
            amount=to_decimal(p.amount) if p.currency else Decimal(p.amount),
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
    price = await change_price(session, item, data.amount, admin=admin)
    return PriceRead(
        item=item,
        amount=to_decimal(price.amount) if price.currency else Decimal(price.amount),
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
