"""Holds: funds moved from a user's available to their held balance (coupons first), later
settled (charged, the rest released) or released, each exactly once. Services flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import audit
from flplatform.billing.ledger import (
    AccountRef,
    InsufficientFunds,
    Leg,
    Payer,
    payer_account,
    post_entry,
    system_account,
)
from flplatform.billing.limits import check_limit
from flplatform.billing.money import to_decimal
from flplatform.billing.monthly import check_not_overdue
from flplatform.billing.operations import Spend, operation_by_key, payer_accounts, record_operation
from flplatform.orm.base import utcnow
from flplatform.orm.billing import AccountKind, Currency, Hold, HoldStatus, Operation, OperationKind


async def reserve(
    session: AsyncSession,
    *,
    owner_id: uuid.UUID,
    amount: int,
    key: str,
    currency: Currency = Currency.USD,
    allow_coupons: bool = True,
    training_id: uuid.UUID | None = None,
    round: int | None = None,
    details: dict[str, Any] | None = None,
    actor_id: uuid.UUID | None = None,
    organization_id: uuid.UUID | None = None,
) -> Hold:
    """Move ``amount`` (coupons first) from available to held; 402 if it is not there. With
    ``organization_id`` the organisation's money is held for the member ``owner_id``, within the
    member's spending limit."""
    if amount <= 0:
        raise ValueError("a hold is positive")
    payer = Payer(owner_id, organization_id)
    cash, coupon = await payer_accounts(session, payer, currency, allow_coupons)
    held_cash = await payer_account(session, payer, currency, held=True)
    held_coupon = await payer_account(session, payer, Currency.COUPON, held=True) if coupon else None
    split = Spend()

    async def build(balances: Mapping[uuid.UUID, int]) -> list[Leg]:
        await check_not_overdue(session, payer)
        await check_limit(session, payer, currency, amount)  # under the account locks
        from_coupon = min(balances.get(coupon.id, 0), amount) if coupon else 0
        from_cash = amount - from_coupon
        if balances[cash.id] < from_cash:
            raise InsufficientFunds(
                f"Insufficient funds to reserve {to_decimal(amount)} {currency.value}: available "
                f"{to_decimal(balances[cash.id])}"
                + (f" plus {to_decimal(from_coupon)} in coupons." if coupon else ".")
            )
        split.coupon, split.cash = from_coupon, from_cash
        legs = [Leg(cash, -from_cash), Leg(held_cash, from_cash)]
        if from_coupon:
            assert coupon and held_coupon
            legs += [Leg(coupon, -from_coupon), Leg(held_coupon, from_coupon)]
        return legs

    lock = [a for a in (cash, coupon, held_cash, held_coupon) if a is not None]
    entry, created = await post_entry(
        session,
        key=f"{key}:hold",
        kind="hold",
        legs=build,
        lock=lock,
        actor_id=actor_id or owner_id,
        intent={"owner": owner_id, "organization": organization_id, "amount": amount, "currency": currency},
        description=f"hold {key}",
    )
    if not created:
        hold = (await session.execute(select(Hold).where(Hold.key == key))).scalar_one()
        return hold
    hold = Hold(
        key=key,
        owner_id=owner_id,
        organization_id=organization_id,
        currency=currency,
        amount=split.cash,
        coupon_amount=split.coupon,
        entry_id=entry.id,
        training_id=training_id,
        round=round,
        details=details or {},
    )
    session.add(hold)
    await session.flush()
    await audit.record(
        session,
        "billing.hold",
        f"hold {to_decimal(amount)} {currency.value} key={key}",
        actor=actor_id or owner_id,
        subject_user_id=owner_id,
        organisation_id=organization_id,
        module=__name__,
        function="reserve",
    )
    return hold


async def _claim_hold(session: AsyncSession, hold: Hold, status: HoldStatus) -> bool:
    """Resolve the hold at most once: one conditional UPDATE decides between racers."""
    result = await session.execute(
        update(Hold)
        .where(Hold.id == hold.id, Hold.status == HoldStatus.OPEN)
        .values(status=status, resolved_at=utcnow())
        .returning(Hold.id)
        .execution_options(synchronize_session=False)
    )
    return result.first() is not None


async def _account(
    session: AsyncSession, hold: Hold, currency: Currency, *, held: bool = False
) -> AccountRef:
    """The hold's holder account: its organisation's, or its owner's."""
    return await payer_account(session, Payer(hold.owner_id, hold.organization_id), currency, held=held)


async def _refresh(session: AsyncSession, hold: Hold) -> Hold:
    await session.refresh(hold)
    return hold


async def settle(
    session: AsyncSession,
    hold: Hold,
    cost: int,
    *,
    kind: OperationKind = OperationKind.TRAINING,
    actor_id: uuid.UUID | None = None,
    description: str = "",
    **fields: Any,
) -> Operation | None:
    """Charge ``cost`` (capped at what is held; coupons first) to revenue and release the rest.

    Returns the operation, or None when the hold was already released. Settling twice returns
    the first settlement's operation.
    """
    if cost < 0:
        raise ValueError("cost is not negative")
    if not await _claim_hold(session, hold, HoldStatus.SETTLED):
        hold = await _refresh(session, hold)
        if hold.status == HoldStatus.SETTLED:
            return await operation_by_key(session, hold.key)
        return None
    billed = min(cost, hold.amount + hold.coupon_amount)
    from_coupon = min(hold.coupon_amount, billed)
    from_cash = billed - from_coupon
    owner = hold.owner_id
    cash = await _account(session, hold, hold.currency)
    held_cash = await _account(session, hold, hold.currency, held=True)
    legs = [Leg(held_cash, -hold.amount), Leg(cash, hold.amount - from_cash)]
    if billed:
        legs.append(Leg(await system_account(session, AccountKind.REVENUE, hold.currency), billed))
    if hold.coupon_amount:
        legs += [
            Leg(await _account(session, hold, Currency.COUPON, held=True), -hold.coupon_amount),
            Leg(await _account(session, hold, Currency.COUPON), hold.coupon_amount - from_coupon),
        ]
        if from_coupon:
            legs += [
                Leg(await system_account(session, AccountKind.PROMOTIONS, Currency.COUPON), from_coupon),
                Leg(await system_account(session, AccountKind.PROMOTIONS, Currency.USD), -from_coupon),
            ]
    op, _ = await record_operation(
        session,
        key=hold.key,
        entry_key=f"{hold.key}:settle",
        kind=kind,
        legs=legs,
        intent={"hold": hold.id, "cost": cost},
        currency=hold.currency,
        amount=billed,
        actor_id=actor_id or owner,
        description=description or f"settle {hold.key}",
        payer_id=owner,
        organization_id=hold.organization_id,
        training_id=hold.training_id,
        round=hold.round,
        **fields,
    )
    await session.execute(
        update(Hold)
        .where(Hold.id == hold.id)
        .values(resolution_entry_id=op.entry_id)
        .execution_options(synchronize_session=False)
    )
    await _refresh(session, hold)
    return op


async def release(
    session: AsyncSession, hold: Hold, *, reason: str = "", actor_id: uuid.UUID | None = None
) -> bool:
    """Give the held funds back. Returns False when the hold was already resolved."""
    if not await _claim_hold(session, hold, HoldStatus.RELEASED):
        await _refresh(session, hold)
        return False
    owner = hold.owner_id
    legs = [
        Leg(await _account(session, hold, hold.currency, held=True), -hold.amount),
        Leg(await _account(session, hold, hold.currency), hold.amount),
    ]
    if hold.coupon_amount:
        legs += [
            Leg(await _account(session, hold, Currency.COUPON, held=True), -hold.coupon_amount),
            Leg(await _account(session, hold, Currency.COUPON), hold.coupon_amount),
        ]
    entry, _ = await post_entry(
        session,
        key=f"{hold.key}:release",
        kind="release",
        legs=[leg for leg in legs if leg.amount],
        intent={"hold": hold.id},
        actor_id=actor_id or owner,
        description=(reason or f"release {hold.key}")[:500],
    )
    await session.execute(
        update(Hold)
        .where(Hold.id == hold.id)
        .values(resolution_entry_id=entry.id)
        .execution_options(synchronize_session=False)
    )
    await _refresh(session, hold)
    await audit.record(
        session,
        "billing.release",
        f"released hold {hold.key}: {reason}",
        actor=actor_id or owner,
        subject_user_id=owner,
        organisation_id=hold.organization_id,
        module=__name__,
        function="release",
    )
    return True


async def hold_by_key(session: AsyncSession, key: str) -> Hold | None:
    return (await session.execute(select(Hold).where(Hold.key == key))).scalar_one_or_none()
