"""Bills: an amount an administrator asks a user or an organisation to pay, paid once from the
USD balance (an organisation's by one of its admins)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import audit
from flplatform.billing.money import to_decimal
from flplatform.billing.operations import charge
from flplatform.errors import NotFound
from flplatform.kit.pagination import paginate
from flplatform.orm.base import utcnow
from flplatform.orm.billing import Bill, BillStatus, Operation, OperationKind


async def create_bill(
    session: AsyncSession,
    *,
    user_id: uuid.UUID | None = None,
    organization_id: uuid.UUID | None = None,
    amount: int,
    description: str = "",
    period: str | None = None,
    created_by: uuid.UUID | None = None,
    due_at: dt.datetime | None = None,
) -> Bill:
    if amount <= 0:
        raise ValueError("a bill is positive")
    if (user_id is None) == (organization_id is None):
        raise ValueError("a bill is addressed to one user or one organisation")
    bill = Bill(
        user_id=user_id,
        organization_id=organization_id,
        amount=amount,
        description=description,
        period=period,
        created_by_id=created_by,
        due_at=due_at,
    )
    session.add(bill)
    await session.flush()
    await audit.record(
        session,
        "billing.bill_created",
        f"bill {bill.id}: {to_decimal(amount)} USD",
        actor=created_by,
        subject_user_id=user_id,
        organisation_id=organization_id,
        module=__name__,
        function="create_bill",
    )
    return bill


async def get_bill(session: AsyncSession, bill_id: uuid.UUID) -> Bill:
    bill = await session.get(Bill, bill_id)
    if bill is None:
        raise NotFound(f"Bill {bill_id} not found.")
    return bill


async def pay_bill(
    session: AsyncSession, bill: Bill, *, actor_id: uuid.UUID | None = None
) -> Operation | None:
    """Pay an open bill from the user's (or the organisation's) USD balance (no coupons): once;
    402 if unaffordable. An organisation's bill is paid by ``actor_id``, one of its admins. A
    settled bill (prepaid monthly usage) has nothing to pay: None, nothing moves."""
    if bill.status == BillStatus.SETTLED:
        return None
    payer = bill.user_id if bill.user_id is not None else actor_id
    assert payer is not None, "an organisation's bill is paid by someone"
    op = await charge(
        session,
        payer_id=payer,
        organization_id=bill.organization_id,
        amount=bill.amount,
        kind=OperationKind.PAY_BILL,
        key=f"bill:{bill.id}",
        currency=bill.currency,
        allow_coupons=False,
        actor_id=actor_id,
        description=f"bill {bill.id}",
    )
    await session.execute(
        update(Bill)
        .where(Bill.id == bill.id, Bill.status == BillStatus.OPEN)
        .values(status=BillStatus.PAID, operation_id=op.id, paid_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    await session.refresh(bill)
    return op


async def list_bills(
    session: AsyncSession,
    user_id: uuid.UUID | None = None,
    *,
    organization_id: uuid.UUID | None = None,
    status: BillStatus | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Bill], int]:
    """A page of the user's (or the organisation's) bills, newest first, and their total."""
    conditions: list[Any] = [
        Bill.organization_id == organization_id if organization_id is not None else Bill.user_id == user_id
    ]
    if status is not None:
        conditions.append(Bill.status == status)
    return await paginate(
        session,
        select(Bill).where(*conditions),
        order_by=(Bill.created_at.desc(), Bill.id),
        limit=limit,
        offset=offset,
    )
