"""What the ledger says: balances, monthly statements, per-model reports and the operation
history. Read-only."""

from __future__ import annotations

import calendar
import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from flplatform.billing.ledger import account_balance, user_account
from flplatform.errors import BadRequest
from flplatform.kit.pagination import paginate
from flplatform.orm.billing import (
    Bill,
    Currency,
    JournalEntry,
    LedgerAccount,
    Operation,
    OperationKind,
    Posting,
)

INFERENCE_KINDS = (OperationKind.INFERENCE, OperationKind.INFERENCE_API, OperationKind.INFERENCE_MARKET)


def month_bounds(period: str) -> tuple[dt.datetime, dt.datetime]:
    try:
        year, month = (int(p) for p in period.split("-"))
        start = dt.datetime(year, month, 1, tzinfo=dt.UTC)
        if not 1970 <= year <= 2999:  # kit.schemas.PERIOD_PATTERN; the month's end must be a datetime
            raise ValueError(period)
    except ValueError:
        raise BadRequest(f"Period {period!r} is not YYYY-MM.") from None
    days = calendar.monthrange(year, month)[1]
    return start, start + dt.timedelta(days=days)


async def statement(
    session: AsyncSession, user_id: uuid.UUID, period: str, *, organization: bool = False
) -> dict[str, Any]:
    """Monthly statement: per currency opening/closing balance (available + held), money in and
    out; operations by kind; bills of the month. ``organization=True``: ``user_id`` is an
    organisation, and the statement adds what each member spent (``members``) and what its
    models earned on the market."""
    start, end = month_bounds(period)
    holder = LedgerAccount.organization_id if organization else LedgerAccount.owner_id
    own = select(LedgerAccount.id).where(holder == user_id).scalar_subquery()

    async def totals(*conditions: Any) -> dict[Currency, int]:
        stmt = (
            select(Posting.currency, func.sum(Posting.amount))
            .join(JournalEntry, JournalEntry.id == Posting.entry_id)
            .where(Posting.account_id.in_(own), *conditions)
            .group_by(Posting.currency)
        )
        return {c: int(t) for c, t in await session.execute(stmt)}

    opening = await totals(JournalEntry.created_at < start)
    closing = await totals(JournalEntry.created_at < end)
    in_period = (JournalEntry.created_at >= start, JournalEntry.created_at < end)
    # Moves between a user's own available and held accounts cancel out per entry.
    per_entry = (
        select(Posting.entry_id, Posting.currency, func.sum(Posting.amount).label("net"))
        .join(JournalEntry, JournalEntry.id == Posting.entry_id)
        .where(Posting.account_id.in_(own), *in_period)
        .group_by(Posting.entry_id, Posting.currency)
        .subquery()
    )
    flows: dict[Currency, dict[str, int]] = defaultdict(lambda: {"in": 0, "out": 0})
    for currency, net in await session.execute(select(per_entry.c.currency, per_entry.c.net)):
        flows[currency]["in" if net > 0 else "out"] += abs(int(net))
    month = (Operation.created_at >= start, Operation.created_at < end)
    paid_by = (
        Operation.organization_id == user_id
        if organization
        # Personal money: what the user paid themselves, and what they moved into an organisation.
        else and_(
            Operation.payer_id == user_id,
            or_(Operation.organization_id.is_(None), Operation.kind == OperationKind.TOP_UP),
        )
    )
    ops = await session.execute(
        select(Operation.kind, func.count(), func.sum(Operation.amount), Operation.currency)
        .where(paid_by, *month)
        .group_by(Operation.kind, Operation.currency)
    )
    members: list[dict[str, Any]] = []
    earnings: list[dict[str, Any]] = []
    if organization:
        members = [
            {"user_id": payer, "kind": kind, "count": int(count), "amount": int(total or 0), "currency": cur}
            for payer, kind, count, total, cur in await session.execute(
                select(
                    Operation.payer_id,
                    Operation.kind,
                    func.count(),
                    func.sum(Operation.amount),
                    Operation.currency,
                )
                .where(paid_by, Operation.kind != OperationKind.TOP_UP, *month)
                .group_by(Operation.payer_id, Operation.kind, Operation.currency)
                .order_by(Operation.payer_id, Operation.kind)
            )
        ]
        earnings = await model_earnings(session, organization_id=user_id, since=start, until=end)
    bills = (
        (
            await session.execute(
                select(Bill).where(
                    (Bill.organization_id if organization else Bill.user_id) == user_id,
                    or_(and_(Bill.created_at >= start, Bill.created_at < end), Bill.period == period),
                )
            )
        )
        .scalars()
        .all()
    )
    currencies = sorted(set(opening) | set(closing) | set(flows), key=lambda c: c.value)
    return {
        "user_id": user_id,
        "period": period,
        "start": start,
        "end": end,
        "currencies": [
            {
                "currency": c,
                "opening": opening.get(c, 0),
                "closing": closing.get(c, 0),
                "money_in": flows[c]["in"],
                "money_out": flows[c]["out"],
            }
            for c in currencies
        ],
        "operations": [
            {"kind": kind, "count": int(count), "amount": int(total or 0), "currency": currency}
            for kind, count, total, currency in ops
        ],
        "bills": list(bills),
        **({"organization_id": user_id, "members": members, "earnings": earnings} if organization else {}),
    }


def _earnings_query(
    *,
    organization_id: uuid.UUID | None,
    owner_id: uuid.UUID | None,
    model_id: uuid.UUID | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> Any:  # a grouped Select of (model_id, currency, sales, gross, earnings)
    signed = case((Operation.kind == OperationKind.REFUND, -1), else_=1)
    conditions: list[Any] = [Operation.owner_income != 0]
    if organization_id is not None:
        conditions.append(Operation.model_organization_id == organization_id)
    if owner_id is not None:
        conditions += [Operation.model_owner_id == owner_id, Operation.model_organization_id.is_(None)]
    if model_id is not None:
        conditions.append(Operation.model_id == model_id)
    if since is not None:
        conditions.append(Operation.created_at >= since)
    if until is not None:
        conditions.append(Operation.created_at < until)
    return (
        select(
            Operation.model_id,
            Operation.currency,
            func.sum(signed),
            func.sum(Operation.amount * signed),
            func.sum(Operation.owner_income),
        )
        .where(*conditions)
        .group_by(Operation.model_id, Operation.currency)
    )


def _earnings_lines(rows: Any) -> list[dict[str, Any]]:
    return [
        {"model_id": m, "currency": c, "sales": int(n), "gross": int(g or 0), "earnings": int(e or 0)}
        for m, c, n, g, e in rows
    ]


async def model_earnings(
    session: AsyncSession,
    *,
    organization_id: uuid.UUID | None = None,
    owner_id: uuid.UUID | None = None,
    model_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """What the seller's models earned on the market (inference and copies), per model and
    currency, net of refunds: the organisation's (``organization_id``) or, in the
    organisation-less space, an owner's (``owner_id``)."""
    query = _earnings_query(
        organization_id=organization_id, owner_id=owner_id, model_id=model_id, since=since, until=until
    )
    return _earnings_lines(await session.execute(query.order_by(Operation.model_id, Operation.currency)))


async def model_earnings_page(
    session: AsyncSession,
    *,
    limit: int,
    offset: int,
    organization_id: uuid.UUID | None = None,
    owner_id: uuid.UUID | None = None,
    model_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """A page of :func:`model_earnings`' lines (by model, then currency) and their total."""
    query = _earnings_query(
        organization_id=organization_id, owner_id=owner_id, model_id=model_id, since=since, until=until
    )
    total = (await session.execute(select(func.count()).select_from(query.subquery()))).scalar_one()
    rows = await session.execute(
        query.order_by(Operation.model_id, Operation.currency).limit(limit).offset(offset)
    )
    return _earnings_lines(rows), int(total)


async def model_report(session: AsyncSession, model_id: uuid.UUID) -> dict[str, Any]:
    """Seed's per-machine billing summary: training cost, inference cost, API (market) income —
    net of refunds."""
    refund = aliased(Operation)
    not_refunded = ~select(refund.id).where(refund.refunds_operation_id == Operation.id).exists()
    rows = await session.execute(
        select(
            Operation.kind,
            Operation.currency,
            func.count(),
            func.sum(Operation.amount),
            func.sum(Operation.owner_income),
        )
        .where(Operation.model_id == model_id, Operation.kind != OperationKind.REFUND, not_refunded)
        .group_by(Operation.kind, Operation.currency)
    )
    report: dict[str, Any] = {
        "model_id": model_id,
        "training_cost": 0,
        "inference_cost": 0,
        "api_income": 0,
        "training_operations": 0,
        "inference_operations": 0,
        "samples_inferred": 0,
    }
    for kind, _currency, count, amount, income in rows:
        if kind == OperationKind.TRAINING:
            report["training_cost"] += int(amount or 0)
            report["training_operations"] += int(count)
        elif kind in INFERENCE_KINDS:
            report["inference_cost"] += int(amount or 0)
            report["inference_operations"] += int(count)
            report["api_income"] += int(income or 0)
    report["samples_inferred"] = int(
        (
            await session.execute(
                select(func.coalesce(func.sum(Operation.count_of_lines), 0)).where(
                    Operation.model_id == model_id, Operation.kind.in_(INFERENCE_KINDS), not_refunded
                )
            )
        ).scalar_one()
        or 0
    )
    return report


async def list_operations(
    session: AsyncSession,
    *,
    user_id: uuid.UUID | None,
    kind: OperationKind | None = None,
    model_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 100,
    offset: int = 0,
    organization_id: uuid.UUID | None = None,
    payer_id: uuid.UUID | None = None,
) -> tuple[Sequence[Operation], int]:
    """A page of operations, newest first. ``user_id``: those the user paid, acted on or earned
    from; ``organization_id``: those the organisation paid, was credited or earned from;
    ``payer_id``: those that member spent."""
    conditions: list[Any] = []
    if organization_id is not None:
        conditions.append(
            or_(
                Operation.organization_id == organization_id,
                Operation.model_organization_id == organization_id,
            )
        )
    if payer_id is not None:
        conditions.append(Operation.payer_id == payer_id)
    if user_id is not None:
        conditions.append(
            or_(
                Operation.payer_id == user_id,
                Operation.actor_id == user_id,
                Operation.model_owner_id == user_id,
            )
        )
    if kind is not None:
        conditions.append(Operation.kind == kind)
    if model_id is not None:
        conditions.append(Operation.model_id == model_id)
    if since is not None:
        conditions.append(Operation.created_at >= since)
    if until is not None:
        conditions.append(Operation.created_at < until)
    return await paginate(
        session,
        select(Operation).where(*conditions),
        order_by=(Operation.created_at.desc(), Operation.id),
        limit=limit,
        offset=offset,
    )


async def balances(
    session: AsyncSession, user_id: uuid.UUID, *, organization: bool = False
) -> list[dict[str, Any]]:
    """Available and held per currency of a user (or with ``organization=True`` an organisation)."""
    holder = LedgerAccount.organization_id if organization else LedgerAccount.owner_id
    rows = await session.execute(
        select(LedgerAccount.currency, LedgerAccount.kind, LedgerAccount.balance).where(holder == user_id)
    )
    table: dict[Currency, dict[str, int]] = {c: {"available": 0, "held": 0} for c in Currency}
    for currency, kind, balance in rows:
        table[currency][kind.value] = int(balance or 0)  # user accounts: never NULL
    return [{"currency": c, **v} for c, v in table.items()]


async def available(session: AsyncSession, user_id: uuid.UUID, currency: Currency = Currency.USD) -> int:
    return await account_balance(session, await user_account(session, user_id, currency))
