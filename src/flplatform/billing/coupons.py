"""Coupons: codes an administrator issues, each redemption crediting the user's COUPON balance
(spent before USD on usage), once per user and coupon. A member of an organisation redeems into
the organisation's COUPON balance, which is what their usage spends."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import audit
from flplatform.billing.ledger import Leg, payer_account, payer_of, system_account
from flplatform.billing.money import to_decimal
from flplatform.billing.operations import operation_by_key, record_operation
from flplatform.errors import Conflict, NotFound
from flplatform.kit.pagination import paginate
from flplatform.orm.base import utcnow
from flplatform.orm.billing import AccountKind, Coupon, CouponRedemption, Currency, Operation, OperationKind


async def create_coupon(
    session: AsyncSession,
    *,
    code: str,
    amount: int,
    max_redemptions: int = 1,
    expires_at: dt.datetime | None = None,
    created_by: uuid.UUID | None = None,
) -> Coupon:
    if amount <= 0 or max_redemptions < 1:
        raise ValueError("a coupon has a positive amount and at least one redemption")
    if (await session.execute(select(Coupon.id).where(Coupon.code == code))).first() is not None:
        raise Conflict(f"Coupon code {code!r} exists.", code="coupon_exists")
    coupon = Coupon(
        code=code,
        amount=amount,
        max_redemptions=max_redemptions,
        expires_at=expires_at,
        created_by_id=created_by,
    )
    session.add(coupon)
    await session.flush()
    await audit.record(
        session,
        "billing.coupon_created",
        f"coupon {code}: {to_decimal(amount)} × {max_redemptions}",
        actor=created_by,
        module=__name__,
        function="create_coupon",
    )
    return coupon


async def redeem_coupon(session: AsyncSession, *, user_id: uuid.UUID, code: str) -> Operation:
    """Credit the coupon's amount to the user's COUPON balance, once per user and coupon."""
    coupon = (await session.execute(select(Coupon).where(Coupon.code == code))).scalar_one_or_none()
    if coupon is None:
        raise NotFound(f"Coupon {code!r} not found.")
    key = f"coupon:{coupon.id}:user:{user_id}"
    existing = await operation_by_key(session, key)
    if existing is not None:
        return existing
    if coupon.expires_at is not None and coupon.expires_at <= utcnow():
        raise Conflict(f"Coupon {code!r} has expired.", code="coupon_expired")
    taken = await session.execute(
        update(Coupon)
        .where(Coupon.id == coupon.id, Coupon.redemptions < Coupon.max_redemptions)
        .values(redemptions=Coupon.redemptions + 1)
        .returning(Coupon.id)
        .execution_options(synchronize_session=False)
    )
    if taken.first() is None:
        raise Conflict(f"Coupon {code!r} has been fully redeemed.", code="coupon_exhausted")
    payer = await payer_of(session, user_id)
    legs = [
        Leg(await system_account(session, AccountKind.PROMOTIONS, Currency.COUPON), -coupon.amount),
        Leg(await payer_account(session, payer, Currency.COUPON), coupon.amount),
    ]
    op, created = await record_operation(
        session,
        key=key,
        kind=OperationKind.COUPON_REDEMPTION,
        legs=legs,
        currency=Currency.COUPON,
        amount=coupon.amount,
        intent={"coupon": coupon.id, "user": user_id},
        actor_id=user_id,
        payer_id=user_id,
        organization_id=payer.organization_id,
        description=f"coupon {code}",
    )
    if created:
        session.add(CouponRedemption(coupon_id=coupon.id, user_id=user_id, operation_id=op.id))
        await session.flush()
    return op


async def list_coupons(
    session: AsyncSession, *, limit: int = 100, offset: int = 0
) -> tuple[list[Coupon], int]:
    """A page of every coupon, newest first, and the total."""
    return await paginate(
        session, select(Coupon), order_by=(Coupon.created_at.desc(), Coupon.id), limit=limit, offset=offset
    )
