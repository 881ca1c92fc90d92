"""Per-member spending limits on an organisation's money, set by its admins.

A member acting for their organisation spends from its accounts (``ledger.Payer``). Their
spending in a currency over the UTC calendar month is what their operations charged the
organisation (net of refunds) plus their open holds (running training rounds). A limit caps it:
a spend that would pass the cap is refused with 402 ``spending_limit_exceeded`` and nothing is
written.

The check runs inside the ledger's leg builder, after the organisation's account row is locked
(``SELECT … FOR UPDATE`` on PostgreSQL): every spend from that account waits for the one before
it to commit, so the sum read under the lock includes it and two requests can never both pass the
cap. No limit row: no cap.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.billing.ledger import Payer
from flplatform.billing.money import to_decimal
from flplatform.errors import PaymentRequired
from flplatform.kit.pagination import paginate
from flplatform.orm.base import utcnow
from flplatform.orm.billing import Currency, Hold, HoldStatus, Operation, OperationKind, SpendingLimit

#: Operations that spend (their amount counts); refunds of them count back.
SPEND_KINDS = (
    OperationKind.TRAINING,
    OperationKind.INFERENCE,
    OperationKind.INFERENCE_API,
    OperationKind.INFERENCE_MARKET,
    OperationKind.MODEL_COPY,
    OperationKind.MODEL_COPY_UPDATE,
)


class SpendingLimitExceeded(PaymentRequired):
    code = "spending_limit_exceeded"


def month_start(now: dt.datetime | None = None) -> dt.datetime:
    now = now or utcnow()
    return now.astimezone(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def member_spent(
    session: AsyncSession,
    organization_id: uuid.UUID,
    user_id: uuid.UUID,
    currency: Currency,
    *,
    since: dt.datetime | None = None,
) -> int:
    """What the member spent of the organisation's ``currency`` since ``since`` (default: this
    month): charges net of refunds, plus their open holds."""
    since = since or month_start()
    signed = case((Operation.kind == OperationKind.REFUND, -Operation.amount), else_=Operation.amount)
    charged = (
        await session.execute(
            select(func.coalesce(func.sum(signed), 0)).where(
                Operation.organization_id == organization_id,
                Operation.payer_id == user_id,
                Operation.currency == currency,
                Operation.created_at >= since,
                Operation.kind.in_((*SPEND_KINDS, OperationKind.REFUND)),
            )
        )
    ).scalar_one()
    held = (
        await session.execute(
            select(func.coalesce(func.sum(Hold.amount + Hold.coupon_amount), 0)).where(
                Hold.organization_id == organization_id,
                Hold.owner_id == user_id,
                Hold.currency == currency,
                Hold.status == HoldStatus.OPEN,
            )
        )
    ).scalar_one()
    return int(charged or 0) + int(held or 0)


async def get_limit(
    session: AsyncSession, organization_id: uuid.UUID, user_id: uuid.UUID, currency: Currency
) -> SpendingLimit | None:
    return await session.get(SpendingLimit, (organization_id, user_id, currency))


async def check_limit(session: AsyncSession, payer: Payer, currency: Currency, amount: int) -> None:
    """Raise 402 when spending ``amount`` more would pass the member's monthly limit. Call it with
    the organisation's account locked (inside a ledger leg builder)."""
    if payer.organization_id is None:
        return
    row = await get_limit(session, payer.organization_id, payer.user_id, currency)
    if row is None:
        return
    limit = row.amount
    spent = await member_spent(session, payer.organization_id, payer.user_id, currency)
    if spent + amount > limit:
        raise SpendingLimitExceeded(
            f"This would take your spending from your organisation's {currency.value} this month to "
            f"{to_decimal(spent + amount)}, over the limit of {to_decimal(limit)} its admins set "
            f"(already spent: {to_decimal(spent)}). Ask an organisation admin to raise it.",
        )


async def set_limit(
    session: AsyncSession,
    organization_id: uuid.UUID,
    user_id: uuid.UUID,
    currency: Currency,
    amount: int | None,
    *,
    by: uuid.UUID | None,
) -> SpendingLimit | None:
    """Set (or with ``amount=None`` remove) a member's monthly limit."""
    row = await get_limit(session, organization_id, user_id, currency)
    if amount is None:
        if row is not None:
            await session.delete(row)
            await session.flush()
        return None
    if row is None:
        row = SpendingLimit(organization_id=organization_id, user_id=user_id, currency=currency)
        session.add(row)
    row.amount, row.updated_by_id, row.updated_at = amount, by, utcnow()
    await session.flush()
    return row


async def list_limits(
    session: AsyncSession, organization_id: uuid.UUID, *, user_id: uuid.UUID | None, limit: int, offset: int
) -> tuple[list[SpendingLimit], int]:
    conditions: list[Any] = [SpendingLimit.organization_id == organization_id]
    if user_id is not None:
        conditions.append(SpendingLimit.user_id == user_id)
    return await paginate(
        session,
        select(SpendingLimit).where(*conditions),
        order_by=(SpendingLimit.user_id, SpendingLimit.currency),
        limit=limit,
        offset=offset,
    )
