"""An organisation's money (``/api/organizations/{id}/billing/…``): its balance and top-ups, its
operations, monthly statements and bills, its members' spending and limits, its market earnings
and its audit log. The organisation's admins (and superusers) see all of it; a member sees their
own spending (``billing.dependencies``); another organisation gets 404.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Path, Query, Request, Response, status
from fastapi.responses import JSONResponse

from flplatform import audit, billing
from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.billing import limits
from flplatform.billing.dependencies import OrgBill, OrgMemberSubject, OrgMoneyAdmin, OrgOperationQuery
from flplatform.billing.idempotency import IdempotencyKeyHeader, idempotent, request_fingerprint
from flplatform.billing.money import to_minor
from flplatform.billing.organizations import fund_organization, member_spending, organization_member
from flplatform.billing.reports import model_earnings_page, month_bounds
from flplatform.billing.schemas import (
    AuditRead,
    BillRead,
    ConversionCreate,
    EarningsLine,
    MemberSpendingRead,
    OperationRead,
    OrganizationBalanceRead,
    OrganizationStatementRead,
    OrganizationTopUp,
    SpendingLimitRead,
    SpendingLimitUpdate,
)
from flplatform.db import SessionDep
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import PERIOD_PATTERN, Limit, Offset, SafeDateTime
from flplatform.orm.billing import BillStatus

router = APIRouter(prefix="/api/organizations/{organization_id}/billing", tags=["organization-billing"])

Period = Annotated[str, Path(pattern=PERIOD_PATTERN, examples=["2026-11"])]


@router.get(
    "/balance/",
    response_model=OrganizationBalanceRead,
    summary="The organisation's balances",
    description="Available and held (reserved for running training rounds) USD, TOKEN and COUPON of the "
    "organisation. For its admins.",
    responses=responses(401, 403, 404),
)
async def get_balance(session: SessionDep, organization: OrgMoneyAdmin) -> OrganizationBalanceRead:
    return OrganizationBalanceRead.model_validate(
        {
            "organization_id": organization.id,
            "balances": await billing.balances(session, organization.id, organization=True),
        }
    )


@router.post(
    "/top-ups/",
    response_model=OperationRead,
    status_code=status.HTTP_201_CREATED,
    summary="Top up the organisation",
    description="An organisation admin moves USD or TOKEN from their own balance into the organisation's "
    "(402 when they lack it); a superuser credits it from external payments. Send an `Idempotency-Key`.",
    responses=responses(401, 402, 403, 404, 422),
)
async def create_top_up(
    request: Request,
    session: SessionDep,
    requester: AuthenticatedRequester,
    organization: OrgMoneyAdmin,
    data: OrganizationTopUp,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    caller = requester.user
    assert caller is not None

    async def run() -> tuple[int, OperationRead]:
        key = f"org-topup:{caller.id}:{idempotency_key}" if idempotency_key else f"org-topup:{uuid.uuid4()}"
        op = await fund_organization(
            session,
            organization.id,
            caller=caller,
            amount=to_minor(data.amount),
            currency=data.currency,
            key=key,
            description=data.description,
        )
        return 201, OperationRead.model_validate(op)

    return await idempotent(
        session,
        user_id=caller.id,
        key=idempotency_key,
        fingerprint=request_fingerprint("POST", request.url.path, data),
        handler=run,
    )


@router.post(
    "/conversions/",
    response_model=OperationRead,
    status_code=status.HTTP_201_CREATED,
    summary="Convert the organisation's USD into tokens",
    description="An admin spends the organisation's USD (not coupons) on TOKEN at the price list's "
    "`token_per_usd` (model copies are priced in tokens). 402 if its USD balance is too low. Send an "
    "`Idempotency-Key`.",
    responses=responses(401, 402, 403, 404, 422),
)
async def create_conversion(
    request: Request,
    session: SessionDep,
    requester: AuthenticatedRequester,
    organization: OrgMoneyAdmin,
    data: ConversionCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    caller = requester.user
    assert caller is not None

    async def run() -> tuple[int, OperationRead]:
        key = (
            f"org-conversion:{caller.id}:{idempotency_key}"
            if idempotency_key
            else f"org-conversion:{uuid.uuid4()}"
        )
        op = await billing.convert_to_tokens(
            session,
            user_id=caller.id,
            organization_id=organization.id,
            usd_amount=to_minor(data.usd_amount),
            key=key,
        )
        return 201, OperationRead.model_validate(op)

    return await idempotent(
        session,
        user_id=caller.id,
        key=idempotency_key,
        fingerprint=request_fingerprint("POST", request.url.path, data),
        handler=run,
    )


@router.get(
    "/operations/",
    response_model=list[OperationRead],
    summary="The organisation's operations",
    description="What the organisation paid (and for which member: `payer_id`), was credited and earned, "
    "newest first; filter by member (`user_id`), kind, model and time (`since` inclusive, `until` "
    "exclusive). Admins see every member's; a member sees their own spending. `X-Total-Count` carries the "
    "total.",
    responses=responses(401, 403, 404, 422),
)
async def list_operations(
    session: SessionDep, response: Response, query: OrgOperationQuery
) -> list[OperationRead]:
    rows, total = await billing.list_operations(
        session,
        user_id=None,
        organization_id=query.organization.id,
        payer_id=query.user_id,
        kind=query.kind,
        model_id=query.model_id,
        since=query.since,
        until=query.until,
        limit=query.limit,
        offset=query.offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [OperationRead.model_validate(r) for r in rows]


@router.get(
    "/statements/{period}/",
    response_model=OrganizationStatementRead,
    summary="The organisation's monthly statement",
    description="For `period` = `YYYY-MM` (UTC): opening and closing balance per currency, money in and out, "
    "operations by kind, what each member spent (the invoice lines), what its models earned on the market, "
    "and the month's bills. For its admins.",
    responses=responses(400, 401, 403, 404, 422),
)
async def get_statement(
    session: SessionDep, organization: OrgMoneyAdmin, period: Period
) -> OrganizationStatementRead:
    return OrganizationStatementRead.model_validate(
        await billing.statement(session, organization.id, period, organization=True)
    )


@router.get(
    "/bills/",
    response_model=list[BillRead],
    summary="The organisation's bills (invoices)",
    description="Bills addressed to the organisation, newest first; `status` filters. `X-Total-Count` "
    "carries the total.",
    responses=responses(401, 403, 404, 422),
)
async def list_bills(
    session: SessionDep,
    response: Response,
    organization: OrgMoneyAdmin,
    status: BillStatus | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[BillRead]:
    rows, total = await billing.list_bills(
        session, organization_id=organization.id, status=status, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return [BillRead.model_validate(b) for b in rows]


@router.post(
    "/bills/{bill_id}/pay/",
    response_model=BillRead,
    summary="Pay the organisation's bill",
    description="An admin pays the bill from the organisation's USD balance (no coupons). Paying a paid "
    "bill returns it unchanged. 402 if the balance is too low.",
    responses=responses(401, 402, 403, 404, 422),
)
async def pay_bill(
    request: Request,
    session: SessionDep,
    requester: AuthenticatedRequester,
    bill: OrgBill,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JSONResponse:
    caller = requester.user
    assert caller is not None

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
    "/limits/",
    response_model=list[SpendingLimitRead],
    summary="Members' spending limits",
    description="The monthly caps set on members (a member without one has no cap). For the admins. "
    "`X-Total-Count` carries the total.",
    responses=responses(401, 403, 404, 422),
)
async def list_limits(
    session: SessionDep,
    response: Response,
    organization: OrgMoneyAdmin,
    user_id: uuid.UUID | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[SpendingLimitRead]:
    rows, total = await limits.list_limits(
        session, organization.id, user_id=user_id, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return [SpendingLimitRead.model_validate(r) for r in rows]


@router.put(
    "/limits/{user_id}/",
    response_model=SpendingLimitRead | None,
    summary="Set a member's spending limit",
    description="The most the member may spend of the organisation's `currency` per UTC month (charges net "
    "of refunds, plus open training holds); `amount: null` removes the cap (answers null). A spend that "
    "would pass it is refused with 402 `spending_limit_exceeded`. For the admins.",
    responses=responses(401, 403, 404, 422),
)
async def put_limit(
    session: SessionDep,
    requester: AuthenticatedRequester,
    organization: OrgMoneyAdmin,
    user_id: uuid.UUID,
    data: SpendingLimitUpdate,
) -> SpendingLimitRead | None:
    caller = requester.user
    assert caller is not None
    await organization_member(session, organization.id, user_id)
    amount = None if data.amount is None else to_minor(data.amount)
    row = await limits.set_limit(session, organization.id, user_id, data.currency, amount, by=caller.id)
    await audit.record(
        session,
        "billing.spending_limit",
        f"limit of {user_id} on {data.currency.value}: {data.amount}",
        actor=caller,
        subject_user_id=user_id,
        organisation_id=organization.id,
    )
    return None if row is None else SpendingLimitRead.model_validate(row)


@router.get(
    "/members/{user_id}/spending/",
    response_model=MemberSpendingRead,
    summary="A member's spending this month",
    description="What the member spent of the organisation's USD and TOKEN this UTC month, their limit and "
    "what remains. A member reads their own; the admins read anyone's.",
    responses=responses(401, 403, 404, 422),
)
async def get_member_spending(session: SessionDep, subject: OrgMemberSubject) -> MemberSpendingRead:
    return MemberSpendingRead.model_validate(
        await member_spending(session, subject.organization.id, subject.user_id)
    )


@router.get(
    "/earnings/",
    response_model=list[EarningsLine],
    summary="Market earnings per model",
    description="What the organisation's models earned on the market (paid inference and copies, net of "
    "refunds) per model and currency, for `period` (`YYYY-MM`) or between `since` and `until`. For the "
    "admins. By model, then currency; `limit`/`offset` page the lines and `X-Total-Count` carries the total.",
    responses=responses(400, 401, 403, 404, 422),
)
async def get_earnings(
    session: SessionDep,
    response: Response,
    organization: OrgMoneyAdmin,
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
        session,
        organization_id=organization.id,
        model_id=model_id,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [EarningsLine.model_validate(r) for r in rows]


@router.get(
    "/audit-log/",
    response_model=list[AuditRead],
    summary="The organisation's audit log",
    description="Audit rows recorded for the organisation (its money, limits, roles, invitations…), newest "
    "first; `action` is a prefix. For its admins. `X-Total-Count` carries the total.",
    responses=responses(401, 403, 404, 422),
)
async def list_audit(
    session: SessionDep,
    response: Response,
    organization: OrgMoneyAdmin,
    action: str | None = None,
    actor_id: uuid.UUID | None = None,
    since: SafeDateTime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[AuditRead]:
    rows, total = await audit.list_entries(
        session,
        action=action,
        actor_id=actor_id,
        organisation_id=organization.id,
        since=since,
        limit=limit,
        offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [AuditRead.model_validate(r) for r in rows]
