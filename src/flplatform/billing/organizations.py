"""Organisation money: funding an organisation's account, what its members spend, its earnings.

An organisation holds its own accounts (``ledger.org_account``: available and held, per
currency). Its members spend from them by default (``ledger.payer_of``): training rounds they
run, inference they call, copies they make, within the monthly limits its admins set
(:mod:`~flplatform.billing.limits`). Statements, bills and the operation history take the
organisation as their subject (:mod:`~flplatform.billing.reports`, :mod:`~flplatform.billing.bills`).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.billing.limits import get_limit, member_spent, month_start
from flplatform.billing.operations import top_up
from flplatform.errors import NotFound
from flplatform.orm.billing import Currency, Operation
from flplatform.orm.user import User


async def fund_organization(
    session: AsyncSession,
    organization_id: uuid.UUID,
    *,
    caller: User,
    amount: int,
    currency: Currency,
    key: str,
    description: str = "",
) -> Operation:
    """Top up the organisation: a superuser credits it from ``external_payments`` (as the payment
    webhook does); an organisation admin moves money from their own available balance into it
    (402 when they lack it)."""
    from_user = None if caller.is_superuser else caller.id
    return await top_up(
        session,
        organization_id=organization_id,
        amount=amount,
        currency=currency,
        key=key,
        actor_id=caller.id,
        from_user_id=from_user,
        description=description or ("top-up" if from_user is None else f"funded by {caller.username}"),
    )


async def organization_member(session: AsyncSession, organization_id: uuid.UUID, user_id: uuid.UUID) -> User:
    """A user of the organisation; 404 for anyone else (their existence is not revealed)."""
    user = (
        await session.execute(select(User).where(User.id == user_id, User.organization_id == organization_id))
    ).scalar_one_or_none()
    if user is None:
        raise NotFound(f"User {user_id} not found in organization {organization_id}.")
    return user


async def member_spending(
    session: AsyncSession, organization_id: uuid.UUID, user_id: uuid.UUID
) -> dict[str, Any]:
    """What the member spent of the organisation's USD and TOKEN this UTC month, their limit and
    what remains of it."""
    since = month_start()
    lines = []
    for currency in (Currency.USD, Currency.TOKEN):
        spent = await member_spent(session, organization_id, user_id, currency, since=since)
        row = await get_limit(session, organization_id, user_id, currency)
        limit = None if row is None else row.amount
        lines.append(
            {
                "currency": currency,
                "spent": spent,
                "limit": limit,
                "remaining": None if limit is None else max(limit - spent, 0),
            }
        )
    return {"organization_id": organization_id, "user_id": user_id, "since": since, "spending": lines}
