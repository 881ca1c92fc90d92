"""Recorded money movements: the operation behind every journal entry, charges (coupons first),
top-ups, payouts, conversions and refunds. Services flush, never commit.

Holds live in :mod:`~flplatform.billing.holds`, training rounds in :mod:`~flplatform.billing.rounds`,
inference and the market in :mod:`~flplatform.billing.market`, coupons in
:mod:`~flplatform.billing.coupons`, bills in :mod:`~flplatform.billing.bills`, statements and lists in
:mod:`~flplatform.billing.reports`.

Every function that moves money takes or derives a deterministic key: calling it again with
the same key returns the first result and moves nothing (a retried job never charges twice).
Spending raises :class:`~flplatform.billing.ledger.InsufficientFunds` (HTTP 402) with nothing
written when the payer cannot afford it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import audit
from flplatform.billing.ledger import (
    AccountRef,
    InsufficientFunds,
    Leg,
    Payer,
    get_account,
    org_account,
    payer_account,
    post_entry,
    system_account,
    user_account,
)
from flplatform.billing.limits import SPEND_KINDS, check_limit
from flplatform.billing.money import to_decimal
from flplatform.billing.monthly import check_not_overdue
from flplatform.billing.prices import get_prices
from flplatform.errors import BadRequest, Conflict, NotFound
from flplatform.orm.billing import (
    AccountKind,
    Currency,
    LedgerAccount,
    Operation,
    OperationKind,
    Posting,
)


def object_id(obj: Any) -> uuid.UUID:
    """The id of a row, or the id itself (callers pass either)."""
    identifier: uuid.UUID = getattr(obj, "id", obj)
    return identifier


async def operation_by_key(session: AsyncSession, key: str) -> Operation | None:
    return (await session.execute(select(Operation).where(Operation.key == key))).scalar_one_or_none()


async def get_operation(session: AsyncSession, operation_id: uuid.UUID) -> Operation:
    op = await session.get(Operation, operation_id)
    if op is None:
        raise NotFound(f"Operation {operation_id} not found.")
    return op


async def record_operation(
    session: AsyncSession,
    *,
    key: str,
    kind: OperationKind,
    legs: Any,
    intent: Mapping[str, Any],
    lock: Iterable[AccountRef] = (),
    currency: Currency,
    amount: int | None = None,
    amount_of: Any = None,
    actor_id: uuid.UUID | None = None,
    description: str = "",
    entry_key: str | None = None,
    **fields: Any,
) -> tuple[Operation, bool]:
    """Post the entry and the operation describing it, once per ``key``."""
    entry, created = await post_entry(
        session,
        key=entry_key or key,
        kind=kind.value,
        legs=legs,
        intent=intent,
        lock=lock,
        actor_id=actor_id,
        description=description,
    )
    if not created:
        op = await operation_by_key(session, key)
        if op is None:
            raise Conflict(f"Key {key!r} belongs to another kind of entry.", code="idempotency_key_reused")
        return op, False
    op = Operation(
        key=key,
        kind=kind,
        entry_id=entry.id,
        actor_id=actor_id,
        currency=currency,
        amount=amount if amount is not None else amount_of(),
        description=description[:500],
        **fields,
    )
    session.add(op)
    await session.flush()
    await audit.record(
        session,
        f"billing.{kind.value}",
        f"{kind.value} {to_decimal(op.amount)} {currency.value} payer={op.payer_id} key={key}",
        actor=actor_id,
        subject_user_id=op.payer_id,
        organisation_id=op.organization_id,
        module=__name__,
        function=kind.value,
    )
    return op, True


@dataclass
class Spend:
    """How a payment was split between coupons and cash (filled in by the leg builder)."""

    coupon: int = 0
    cash: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def as_payer(payer: Payer | uuid.UUID) -> Payer:
    return payer if isinstance(payer, Payer) else Payer(payer)


async def payer_accounts(
    session: AsyncSession, payer: Payer | uuid.UUID, currency: Currency, allow_coupons: bool
) -> tuple[AccountRef, AccountRef | None]:
    """The payer's cash account in ``currency`` and, for USD spends that accept them, its coupons
    (the organisation's when the payer acts for one)."""
    payer = as_payer(payer)
    cash = await payer_account(session, payer, currency)
    coupon = (
        await payer_account(session, payer, Currency.COUPON)
        if allow_coupons and currency == Currency.USD
        else None
    )
    return cash, coupon


async def _spend_legs(
    session: AsyncSession, payer_id: Payer | uuid.UUID, cost: int, currency: Currency, allow_coupons: bool
):
    """Accounts to lock and a builder for the payer's side of a payment of ``cost``: coupons
    first (USD only), the rest from cash. Coupon spending destroys the coupon (back to
    ``promotions``) and the promotions budget pays its USD value, so recipients always receive
    ``cost`` in ``currency``."""
    cash, coupon = await payer_accounts(session, payer_id, currency, allow_coupons)
    promo_coupon = await system_account(session, AccountKind.PROMOTIONS, Currency.COUPON) if coupon else None
    promo_cash = await system_account(session, AccountKind.PROMOTIONS, Currency.USD) if coupon else None
    split = Spend()

    def build(balances: Mapping[uuid.UUID, int]) -> list[Leg]:
        from_coupon = min(balances.get(coupon.id, 0), cost) if coupon else 0
        from_cash = cost - from_coupon
        if balances.get(cash.id, 0) < from_cash:
            raise InsufficientFunds(
                f"Insufficient funds: this costs {to_decimal(cost)} {currency.value}, available "
                f"{to_decimal(balances.get(cash.id, 0))} {currency.value}"
                + (f" and {to_decimal(from_coupon)} in coupons." if coupon else "."),
            )
        split.coupon, split.cash = from_coupon, from_cash
        legs = [Leg(cash, -from_cash)]
        if from_coupon:
            assert coupon and promo_coupon and promo_cash
            legs += [Leg(coupon, -from_coupon), Leg(promo_coupon, from_coupon), Leg(promo_cash, -from_coupon)]
        return legs

    return [a for a in (cash, coupon) if a is not None], build, split


async def charge(
    session: AsyncSession,
    *,
    payer_id: uuid.UUID,
    amount: int,
    kind: OperationKind,
    key: str,
    currency: Currency = Currency.USD,
    allow_coupons: bool = True,
    recipients: Sequence[tuple[AccountRef, int]] | None = None,
    actor_id: uuid.UUID | None = None,
    description: str = "",
    organization_id: uuid.UUID | None = None,
    **fields: Any,
) -> Operation:
    """Move ``amount`` from the payer (coupons first for USD) to ``recipients`` (default: revenue).
    With ``organization_id`` the organisation's accounts pay for the member ``payer_id``, within
    the member's spending limit. Raises 402 with nothing written when the payer cannot pay."""
    if amount <= 0:
        raise ValueError("a charge is positive")
    if recipients is None:
        recipients = [(await system_account(session, AccountKind.REVENUE, currency), amount)]
    if sum(a for _, a in recipients) != amount:
        raise ValueError("recipients must receive exactly the amount charged")
    payer = Payer(payer_id, organization_id)
    lock, payer_legs, split = await _spend_legs(session, payer, amount, currency, allow_coupons)
    lock = lock + [acc for acc, _ in recipients]

    async def build(balances: Mapping[uuid.UUID, int]) -> list[Leg]:
        if kind in SPEND_KINDS:
            await check_not_overdue(session, payer)
            await check_limit(session, payer, currency, amount)  # under the account locks
        return payer_legs(balances) + [Leg(acc, a) for acc, a in recipients if a]

    intent = {
        "payer": payer_id,
        "organization": organization_id,
        "amount": amount,
        "currency": currency,
        "recipients": [(r.key, a) for r, a in recipients],
        **{k: v for k, v in fields.items() if k not in ("count_of_lines",)},
    }
    op, _ = await record_operation(
        session,
        key=key,
        kind=kind,
        legs=build,
        intent=intent,
        lock=lock,
        currency=currency,
        amount=amount,
        actor_id=actor_id or payer_id,
        description=description,
        payer_id=payer_id,
        organization_id=organization_id,
        **fields,
    )
    return op


async def top_up(
    session: AsyncSession,
    *,
    user_id: uuid.UUID | None = None,
    organization_id: uuid.UUID | None = None,
    amount: int,
    key: str,
    currency: Currency = Currency.USD,
    actor_id: uuid.UUID | None = None,
    description: str = "",
    from_user_id: uuid.UUID | None = None,
) -> Operation:
    """Credit a user or an organisation from ``external_payments`` (an admin top-up or a
    payment-provider webhook), or with ``from_user_id`` from that user's own available balance
    (an organisation admin funding the organisation; 402 when they lack it)."""
    if amount <= 0:
        raise ValueError("a top-up is positive")
    if (user_id is None) == (organization_id is None):
        raise ValueError("a top-up credits one user or one organisation")
    if currency == Currency.COUPON:
        raise BadRequest("Coupons are issued with coupon codes, not top-ups.")
    target = await (
        org_account(session, organization_id, currency)
        if organization_id is not None
        else user_account(session, user_id, currency)  # type: ignore[arg-type]
    )
    source = await (
        user_account(session, from_user_id, currency)
        if from_user_id is not None
        else system_account(session, AccountKind.EXTERNAL_PAYMENTS, currency)
    )
    op, _ = await record_operation(
        session,
        key=key,
        kind=OperationKind.TOP_UP,
        legs=[Leg(source, -amount), Leg(target, amount)],
        intent={
            "user": user_id,
            "organization": organization_id,
            "amount": amount,
            "currency": currency,
            "from": from_user_id,
        },
        currency=currency,
        amount=amount,
        actor_id=actor_id,
        description=description,
        payer_id=user_id if organization_id is None else from_user_id,
        organization_id=organization_id,
    )
    return op


async def payout(
    session: AsyncSession, *, user_id: uuid.UUID, amount: int, key: str, actor_id: uuid.UUID | None = None
) -> Operation:
    """Pay a model owner's earnings out of the platform (to ``market_payouts``)."""
    if amount <= 0:
        raise ValueError("a payout is positive")
    sink = await system_account(session, AccountKind.MARKET_PAYOUTS, Currency.USD)
    return await charge(
        session,
        payer_id=user_id,
        amount=amount,
        kind=OperationKind.PAYOUT,
        key=key,
        allow_coupons=False,
        recipients=[(sink, amount)],
        actor_id=actor_id,
        description="payout of earnings",
    )


async def convert_to_tokens(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    usd_amount: int,
    key: str,
    organization_id: uuid.UUID | None = None,
) -> Operation:
    """USD → TOKEN at ``token_per_usd``: two balanced currency pairs through the exchange accounts.
    With ``organization_id`` the organisation's USD buys the organisation's tokens (``user_id``:
    the admin who asked)."""
    if usd_amount <= 0:
        raise ValueError("a conversion is positive")
    rate = (await get_prices(session)).amount("token_per_usd")
    tokens = usd_amount * rate
    payer = Payer(user_id, organization_id)
    usd = await payer_account(session, payer, Currency.USD)
    tok = await payer_account(session, payer, Currency.TOKEN)
    legs = [
        Leg(usd, -usd_amount),
        Leg(await system_account(session, AccountKind.EXCHANGE, Currency.USD), usd_amount),
        Leg(await system_account(session, AccountKind.EXCHANGE, Currency.TOKEN), -tokens),
        Leg(tok, tokens),
    ]
    op, _ = await record_operation(
        session,
        key=key,
        kind=OperationKind.CONVERSION,
        legs=legs,
        currency=Currency.USD,
        amount=usd_amount,
        intent={"user": user_id, "organization": organization_id, "usd": usd_amount},
        actor_id=user_id,
        payer_id=user_id,
        organization_id=organization_id,
        description=f"{to_decimal(usd_amount)} USD → {to_decimal(tokens)} TOKEN",
    )
    return op


async def refund(
    session: AsyncSession, *, operation_id: uuid.UUID, actor_id: uuid.UUID | None = None, reason: str = ""
) -> Operation:
    """Reverse an operation with a new entry (the original stays untouched): every posting is
    negated, and money that came out of a hold goes back to the owner's available balance.
    Once per operation; 402 if a recipient no longer has the money."""
    original = await get_operation(session, operation_id)
    if original.kind in (OperationKind.REFUND, OperationKind.CONVERSION):
        raise BadRequest(f"A {original.kind.value} operation cannot be refunded.")
    key = f"refund:{original.id}"
    rows = (
        await session.execute(
            select(
                LedgerAccount.kind,
                LedgerAccount.currency,
                LedgerAccount.owner_id,
                LedgerAccount.organization_id,
                Posting.amount,
            )
            .join(LedgerAccount, LedgerAccount.id == Posting.account_id)
            .where(Posting.entry_id == original.entry_id)
        )
    ).all()
    legs: list[Leg] = []
    for kind, currency, owner, org, amount in rows:
        if kind == AccountKind.HELD:
            kind = AccountKind.AVAILABLE
        legs.append(Leg(await get_account(session, kind, currency, owner, organization_id=org), -amount))
    net: dict[uuid.UUID, int] = defaultdict(int)
    for leg in legs:
        net[leg.account.id] += leg.amount
    if not any(net.values()):  # e.g. a settlement of cost 0: it only released a hold
        raise BadRequest(
            f"Operation {original.id} moved no money between accounts; there is nothing to refund.",
            code="nothing_to_refund",
        )
    op, _ = await record_operation(
        session,
        key=key,
        kind=OperationKind.REFUND,
        legs=legs,
        currency=original.currency,
        amount=original.amount,
        intent={"operation": original.id},
        actor_id=actor_id,
        payer_id=original.payer_id,
        model_id=original.model_id,
        model_owner_id=original.model_owner_id,
        organization_id=original.organization_id,
        model_organization_id=original.model_organization_id,
        refunds_operation_id=original.id,
        owner_income=-original.owner_income,
        description=(reason or f"refund of {original.kind.value}")[:500],
    )
    return op
