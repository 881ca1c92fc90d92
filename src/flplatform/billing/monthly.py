"""Automatic monthly bills for organisations, and the overdue rule.

**Monthly bills.** After a UTC month ends, the ``billing.monthly_bills`` work-queue job (queued by
each server's billing sweep, once per period: its de-duplication key is the period; the handler is
``billing/jobs.py``'s) issues one
bill per organisation that spent in the month: its lines are the statement's invoice lines
(member × kind × currency, :func:`flplatform.billing.reports.statement`), refunds counting back;
its amount is the month's net USD spending. Usage is prepaid — every charge already left the
organisation's balance when it happened — so the bill is issued ``settled``: an invoice, nothing
more to pay. A unique index on (organisation, period) among monthly bills makes the job
idempotent: a re-run (or two workers) issues nothing new.

**Overdue.** An ``open`` bill whose ``due_at`` has passed (administrators' bills are due
``FLP_BILL_DUE_DAYS`` after issue) stops its addressee's new paid work — training rounds,
inference, copies — with 402 ``bill_overdue`` until it is paid. The check runs in the ledger's
spend builders next to the spending limit (:func:`check_not_overdue`).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import audit, workqueue
from flplatform.billing.ledger import Payer
from flplatform.billing.limits import SPEND_KINDS, month_start
from flplatform.billing.money import to_decimal
from flplatform.billing.reports import month_bounds, statement
from flplatform.errors import PaymentRequired
from flplatform.orm.base import utcnow
from flplatform.orm.billing import Bill, BillStatus, Currency, Operation, OperationKind

log = logging.getLogger(__name__)

MONTHLY_BILLS_JOB = "billing.monthly_bills"


class BillOverdue(PaymentRequired):
    code = "bill_overdue"


def previous_period(now: dt.datetime | None = None) -> str:
    """The month (``YYYY-MM``) that ended last."""
    last = month_start(now) - dt.timedelta(days=1)
    return f"{last.year:04d}-{last.month:02d}"


def invoice_lines(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The statement's member lines that bill usage, JSON-ready: spending kinds, and refunds as
    negative amounts."""
    lines = []
    for line in members:
        kind = line["kind"]
        if kind not in (*SPEND_KINDS, OperationKind.REFUND):
            continue
        sign = -1 if kind == OperationKind.REFUND else 1
        lines.append(
            {
                "user_id": str(line["user_id"]) if line["user_id"] is not None else None,
                "kind": kind.value,
                "count": line["count"],
                "amount": str(to_decimal(sign * line["amount"])),
                "currency": line["currency"].value,
            }
        )
    return lines


async def issue_monthly_bill(session: AsyncSession, organization_id: uuid.UUID, period: str) -> Bill | None:
    """The organisation's monthly bill for ``period``: the existing one, a new one, or None when it
    spent no USD that month."""
    existing = await session.scalar(
        select(Bill).where(Bill.organization_id == organization_id, Bill.period == period, Bill.monthly)
    )
    if existing is not None:
        return existing
    report = await statement(session, organization_id, period, organization=True)
    members = [m for m in report["members"] if m["kind"] in (*SPEND_KINDS, OperationKind.REFUND)]
    usd = sum(
        (-m["amount"] if m["kind"] == OperationKind.REFUND else m["amount"])
        for m in members
        if m["currency"] == Currency.USD
    )
    if usd <= 0:
        return None
    bill = Bill(
        organization_id=organization_id,
        amount=usd,
        description=f"Usage {period}: prepaid from the organisation's balance",
        period=period,
        status=BillStatus.SETTLED,
        monthly=True,
        lines=invoice_lines(members),
    )
    try:
        async with session.begin_nested():  # a racing run issued it first: the unique index says so
            session.add(bill)
            await session.flush()
    except IntegrityError:
        found = await session.scalar(
            select(Bill).where(Bill.organization_id == organization_id, Bill.period == period, Bill.monthly)
        )
        if found is None:
            raise
        return found
    await audit.record(
        session,
        "billing.bill_created",
        f"monthly bill {bill.id} for {period}: {to_decimal(usd)} USD (settled)",
        organisation_id=organization_id,
        module=__name__,
        function="issue_monthly_bill",
    )
    return bill


async def issue_monthly_bills(session: AsyncSession, period: str) -> list[Bill]:
    """Every organisation's monthly bill for ``period`` (those that spent in it)."""
    start, end = month_bounds(period)
    payers = await session.scalars(
        select(Operation.organization_id)
        .where(
            Operation.organization_id.is_not(None),
            Operation.created_at >= start,
            Operation.created_at < end,
            Operation.kind.in_(SPEND_KINDS),
        )
        .distinct()
    )
    bills = []
    for organization_id in sorted(o for o in payers.all() if o is not None):
        bill = await issue_monthly_bill(session, organization_id, period)
        if bill is not None:
            bills.append(bill)
    return bills


async def queue_monthly_bills(session: AsyncSession, now: dt.datetime | None = None) -> str:
    """Queue the job for the month that ended last (once: the period is its de-duplication key);
    the caller commits."""
    period = previous_period(now)
    await workqueue.enqueue(
        session, MONTHLY_BILLS_JOB, {"period": period}, dedupe_key=f"{MONTHLY_BILLS_JOB}:{period}"
    )
    return period


async def check_not_overdue(session: AsyncSession, payer: Payer) -> None:
    """Raise 402 ``bill_overdue`` when the payer (the organisation it spends for, else the user)
    has an open bill past its due date."""
    addressee = (
        Bill.organization_id == payer.organization_id
        if payer.organization_id is not None
        else Bill.user_id == payer.user_id
    )
    overdue = await session.scalar(
        select(Bill)
        .where(addressee, Bill.status == BillStatus.OPEN, Bill.due_at.is_not(None), Bill.due_at < utcnow())
        .order_by(Bill.due_at, Bill.id)
        .limit(1)
    )
    if overdue is None:
        return
    assert overdue.due_at is not None
    if payer.organization_id is not None:
        who = "Your organisation has"
        where = f"an organisation admin pays it (POST /api/organizations/{payer.organization_id}/billing/bills/{overdue.id}/pay/)"
    else:
        who = "You have"
        where = f"it is paid (POST /api/billing/bills/{overdue.id}/pay/)"
    raise BillOverdue(
        f"{who} an overdue bill: {to_decimal(overdue.amount)} {overdue.currency.value} "
        f"(bill {overdue.id}), due {overdue.due_at:%Y-%m-%d %H:%M} UTC. New paid work (trainings, "
        f"inference, copies) is stopped until {where}."
    )


__all__ = [
    "MONTHLY_BILLS_JOB",
    "BillOverdue",
    "check_not_overdue",
    "issue_monthly_bills",
    "queue_monthly_bills",
]
