"""Billing operations on top of the ledger core. Services flush, never commit.

Every function that moves money takes or derives a deterministic key: calling it again with
the same key returns the first result and moves nothing (a retried job never charges twice).
Spending raises :class:`~flplatform.billing.ledger.InsufficientFunds` (HTTP 402) with nothing
written when the payer cannot afford it.
"""

from __future__ import annotations

import calendar
import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from flplatform.billing import audit
from flplatform.billing.ledger import (
    AccountRef,
    InsufficientFunds,
    Leg,
    account_balance,
    post_entry,
    system_account,
    user_account,
)
from flplatform.billing.money import basis_points, to_decimal
from flplatform.billing.prices import get_prices
from flplatform.errors import BadRequest, Conflict, NotFound
from flplatform.orm.base import utcnow
from flplatform.orm.billing import (
    AccountKind,
    Bill,
    BillStatus,
    Coupon,
    CouponRedemption,
    Currency,
    Hold,
    HoldStatus,
    JournalEntry,
    LedgerAccount,
    ModelPricing,
    Operation,
    OperationKind,
    Posting,
)

INFERENCE_KINDS = (OperationKind.INFERENCE, OperationKind.INFERENCE_API, OperationKind.INFERENCE_MARKET)


def _id(obj: Any) -> uuid.UUID | None:
    return None if obj is None else getattr(obj, "id", obj)


async def operation_by_key(session: AsyncSession, key: str) -> Operation | None:
    return (await session.execute(select(Operation).where(Operation.key == key))).scalar_one_or_none()


async def get_operation(session: AsyncSession, operation_id: uuid.UUID) -> Operation:
    op = await session.get(Operation, operation_id)
    if op is None:
        raise NotFound(f"Operation {operation_id} not found.")
    return op


async def _record(
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
        module=__name__,
        function=kind.value,
    )
    return op, True


@dataclass
class _Spend:
    """How a payment was split between coupons and cash (filled in by the leg builder)."""

    coupon: int = 0
    cash: int = 0
    extra: dict[str, int] = field(default_factory=dict)


async def _payer_accounts(
    session: AsyncSession, payer_id: uuid.UUID, currency: Currency, allow_coupons: bool
):
    cash = await user_account(session, payer_id, currency)
    coupon = (
        await user_account(session, payer_id, Currency.COUPON)
        if allow_coupons and currency == Currency.USD
        else None
    )
    return cash, coupon


async def _spend_legs(
    session: AsyncSession, payer_id: uuid.UUID, cost: int, currency: Currency, allow_coupons: bool
):
    """Accounts to lock and a builder for the payer's side of a payment of ``cost``: coupons
    first (USD only), the rest from cash. Coupon spending destroys the coupon (back to
    ``promotions``) and the promotions budget pays its USD value, so recipients always receive
    ``cost`` in ``currency``."""
    cash, coupon = await _payer_accounts(session, payer_id, currency, allow_coupons)
    promo_coupon = await system_account(session, AccountKind.PROMOTIONS, Currency.COUPON) if coupon else None
    promo_cash = await system_account(session, AccountKind.PROMOTIONS, Currency.USD) if coupon else None
    split = _Spend()

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
    **fields: Any,
) -> Operation:
    """Move ``amount`` from the payer (coupons first for USD) to ``recipients`` (default: revenue).
    Raises 402 with nothing written when the payer cannot pay."""
    if amount <= 0:
        raise ValueError("a charge is positive")
    if recipients is None:
        recipients = [(await system_account(session, AccountKind.REVENUE, currency), amount)]
    if sum(a for _, a in recipients) != amount:
        raise ValueError("recipients must receive exactly the amount charged")
    lock, payer_legs, split = await _spend_legs(session, payer_id, amount, currency, allow_coupons)
    lock = lock + [acc for acc, _ in recipients]

    def build(balances: Mapping[uuid.UUID, int]) -> list[Leg]:
        return payer_legs(balances) + [Leg(acc, a) for acc, a in recipients if a]

    intent = {
        "payer": payer_id,
        "amount": amount,
        "currency": currency,
        "recipients": [(r.key, a) for r, a in recipients],
        **{k: v for k, v in fields.items() if k not in ("count_of_lines",)},
    }
    op, _ = await _record(
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
        **fields,
    )
    return op


async def top_up(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    amount: int,
    key: str,
    currency: Currency = Currency.USD,
    actor_id: uuid.UUID | None = None,
    description: str = "",
) -> Operation:
    """Credit a user from ``external_payments`` (an admin top-up or a payment-provider webhook)."""
    if amount <= 0:
        raise ValueError("a top-up is positive")
    if currency == Currency.COUPON:
        raise BadRequest("Coupons are issued with coupon codes, not top-ups.")
    target = await user_account(session, user_id, currency)
    source = await system_account(session, AccountKind.EXTERNAL_PAYMENTS, currency)
    op, _ = await _record(
        session,
        key=key,
        kind=OperationKind.TOP_UP,
        legs=[Leg(source, -amount), Leg(target, amount)],
        intent={"user": user_id, "amount": amount, "currency": currency},
        currency=currency,
        amount=amount,
        actor_id=actor_id,
        description=description,
        payer_id=user_id,
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


# --------------------------------------------------------------------------- holds


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
) -> Hold:
    """Move ``amount`` (coupons first) from available to held; 402 if it is not there."""
    if amount <= 0:
        raise ValueError("a hold is positive")
    cash, coupon = await _payer_accounts(session, owner_id, currency, allow_coupons)
    held_cash = await user_account(session, owner_id, currency, held=True)
    held_coupon = await user_account(session, owner_id, Currency.COUPON, held=True) if coupon else None
    split = _Spend()

    def build(balances: Mapping[uuid.UUID, int]) -> list[Leg]:
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
        intent={"owner": owner_id, "amount": amount, "currency": currency},
        description=f"hold {key}",
    )
    if not created:
        hold = (await session.execute(select(Hold).where(Hold.key == key))).scalar_one()
        return hold
    hold = Hold(
        key=key,
        owner_id=owner_id,
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
    cash = await user_account(session, owner, hold.currency)
    held_cash = await user_account(session, owner, hold.currency, held=True)
    legs = [Leg(held_cash, -hold.amount), Leg(cash, hold.amount - from_cash)]
    if billed:
        legs.append(Leg(await system_account(session, AccountKind.REVENUE, hold.currency), billed))
    if hold.coupon_amount:
        legs += [
            Leg(await user_account(session, owner, Currency.COUPON, held=True), -hold.coupon_amount),
            Leg(await user_account(session, owner, Currency.COUPON), hold.coupon_amount - from_coupon),
        ]
        if from_coupon:
            legs += [
                Leg(await system_account(session, AccountKind.PROMOTIONS, Currency.COUPON), from_coupon),
                Leg(await system_account(session, AccountKind.PROMOTIONS, Currency.USD), -from_coupon),
            ]
    op, _ = await _record(
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
        Leg(await user_account(session, owner, hold.currency, held=True), -hold.amount),
        Leg(await user_account(session, owner, hold.currency), hold.amount),
    ]
    if hold.coupon_amount:
        legs += [
            Leg(await user_account(session, owner, Currency.COUPON, held=True), -hold.coupon_amount),
            Leg(await user_account(session, owner, Currency.COUPON), hold.coupon_amount),
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
        module=__name__,
        function="release",
    )
    return True


async def hold_by_key(session: AsyncSession, key: str) -> Hold | None:
    return (await session.execute(select(Hold).where(Hold.key == key))).scalar_one_or_none()


# --------------------------------------------------------------------------- training rounds


def round_key(training_id: uuid.UUID, round_number: int) -> str:
    return f"training:{training_id}:round:{round_number}"


def _epochs(training: Any) -> int:
    value = (getattr(training, "options", None) or {}).get("epochs", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _samples_hint(training: Any, default: int) -> int:
    value = (getattr(training, "options", None) or {}).get("billing_samples_per_update", default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


async def reserve_round(
    session: AsyncSession, training: Any, round_number: int, participants: Sequence[Any]
) -> Hold | None:
    """Reserve the training actor's funds for one round: one update per participant at the
    price list's ``training_update`` + ``training_sample_epoch`` × samples × epochs, where samples
    is ``training_reserve_samples`` (or ``options["billing_samples_per_update"]``) and epochs
    ``options["epochs"]`` (default 1). Priced now; keyed ``training:{id}:round:{n}``. Returns
    None when free; raises 402 (nothing reserved) when the actor cannot afford it. Call it
    before the round starts."""
    prices = await get_prices(session)
    epochs, samples = _epochs(training), _samples_hint(training, prices.amount("training_reserve_samples"))
    per_update = prices.training_update_cost(samples, epochs)
    amount = per_update * len(participants)
    key = round_key(training.id, round_number)
    if amount == 0:
        return await hold_by_key(session, key)
    return await reserve(
        session,
        owner_id=training.actor_id,
        amount=amount,
        key=key,
        training_id=training.id,
        round=round_number,
        currency=prices.currency("training_update"),
        details={
            "participants": [str(_id(p)) for p in participants],
            "update": prices.amount("training_update"),
            "sample_epoch": prices.amount("training_sample_epoch"),
            "epochs": epochs,
            "samples_hint": samples,
        },
    )


async def settle_round(
    session: AsyncSession, training: Any, round_number: int, updates: Sequence[tuple[Any, int]]
) -> Operation | None:
    """Charge the round's received updates (``[(participant, sample_size)]``) at the prices
    fixed when it was reserved, at most the reserved amount, and release the rest. Idempotent;
    None when the round was free or already released. Call it after a successful aggregation."""
    hold = await hold_by_key(session, round_key(training.id, round_number))
    if hold is None:
        return None
    d = hold.details
    samples = sum(max(int(s), 0) for _, s in updates)
    cost = d["update"] * len(updates) + d["sample_epoch"] * samples * d["epochs"]
    return await settle(
        session,
        hold,
        cost,
        kind=OperationKind.TRAINING,
        model_id=getattr(training, "model_id", None),
        model_owner_id=training.actor_id,
        count_of_lines=samples,
        count_of_training_epoch=d["epochs"],
        description=f"training {training.id} round {round_number}: {len(updates)} updates",
    )


async def release_round(session: AsyncSession, training: Any, round_number: int, reason: str = "") -> bool:
    """Release a round's reservation (error, cancellation, timeout). Idempotent."""
    hold = await hold_by_key(session, round_key(training.id, round_number))
    return False if hold is None else await release(session, hold, reason=reason)


# --------------------------------------------------------------------------- inference


async def model_pricing(session: AsyncSession, model_id: uuid.UUID) -> ModelPricing | None:
    return await session.get(ModelPricing, model_id)


async def is_public_for_inference(session: AsyncSession, model_id: uuid.UUID) -> bool:
    """Whether other users may run (and pay for) inference on the model."""
    row = await session.get(ModelPricing, model_id)
    return row is not None and row.inference_public


async def set_model_pricing(
    session: AsyncSession, model_id: uuid.UUID, *, public: bool, price_per_sample: int
) -> ModelPricing:
    row = await session.get(ModelPricing, model_id)
    if row is None:
        row = ModelPricing(model_id=model_id)
        session.add(row)
    row.inference_public, row.inference_price_per_sample = public, price_per_sample
    await session.flush()
    return row


async def charge_inference(
    session: AsyncSession, caller: Any, model: Any, samples: int, *, key: str | None = None
) -> Operation | None:
    """Charge one inference request of ``samples`` samples; call it BEFORE running the model.

    * ``caller`` is not the owner and the model is public with a price (``billing_model_pricing``):
      the caller pays price × samples, the owner is credited that minus ``market_fee_bps``, the
      fee goes to revenue — one entry (kind ``inference_market``).
    * otherwise the caller pays the price list's ``inference_request`` + ``inference_sample`` ×
      samples to revenue (kind ``inference``).

    Coupons are spent before USD. Returns None when free. Raises 402 with nothing written when
    the caller cannot pay. ``key`` makes retries safe (default: a fresh key per call).
    """
    caller_id, model_id, owner_id = _id(caller), _id(model), getattr(model, "owner_id", None)
    key = key or f"inference:{uuid.uuid4()}"
    pricing = await model_pricing(session, model_id)
    if (
        owner_id is not None
        and owner_id != caller_id
        and pricing
        and pricing.inference_public
        and pricing.inference_price_per_sample
    ):
        prices = await get_prices(session)
        cost = pricing.inference_price_per_sample * max(samples, 1)
        fee = basis_points(cost, prices.amount("market_fee_bps"))
        recipients = [(await user_account(session, owner_id, Currency.USD), cost - fee)]
        if fee:
            recipients.append((await system_account(session, AccountKind.REVENUE, Currency.USD), fee))
        return await charge(
            session,
            payer_id=caller_id,
            amount=cost,
            kind=OperationKind.INFERENCE_MARKET,
            key=key,
            recipients=recipients,
            model_id=model_id,
            model_owner_id=owner_id,
            count_of_lines=samples,
            owner_income=cost - fee,
            description=f"inference on public model {model_id}",
        )
    prices = await get_prices(session)
    cost = prices.inference_cost(samples)
    if cost == 0:
        return None
    return await charge(
        session,
        payer_id=caller_id,
        amount=cost,
        kind=OperationKind.INFERENCE,
        key=key,
        currency=prices.currency("inference_sample"),
        model_id=model_id,
        model_owner_id=owner_id,
        count_of_lines=samples,
        description=f"inference on model {model_id}",
    )


async def charge_model_copy(session: AsyncSession, caller: Any, model: Any, *, key: str) -> Operation | None:
    """Charge a model copy at the price list's ``model_copy`` (tokens by default)."""
    prices = await get_prices(session)
    cost = prices.amount("model_copy")
    if cost == 0:
        return None
    return await charge(
        session,
        payer_id=_id(caller),
        amount=cost,
        kind=OperationKind.MODEL_COPY,
        key=key,
        currency=prices.currency("model_copy"),
        allow_coupons=False,
        model_id=_id(model),
        model_owner_id=getattr(model, "owner_id", None),
    )


# --------------------------------------------------------------------------- conversion, coupons, refunds


async def convert_to_tokens(
    session: AsyncSession, *, user_id: uuid.UUID, usd_amount: int, key: str
) -> Operation:
    """USD → TOKEN at ``token_per_usd``: two balanced currency pairs through the exchange accounts."""
    if usd_amount <= 0:
        raise ValueError("a conversion is positive")
    rate = (await get_prices(session)).amount("token_per_usd")
    tokens = usd_amount * rate
    usd = await user_account(session, user_id, Currency.USD)
    tok = await user_account(session, user_id, Currency.TOKEN)
    legs = [
        Leg(usd, -usd_amount),
        Leg(await system_account(session, AccountKind.EXCHANGE, Currency.USD), usd_amount),
        Leg(await system_account(session, AccountKind.EXCHANGE, Currency.TOKEN), -tokens),
        Leg(tok, tokens),
    ]
    op, _ = await _record(
        session,
        key=key,
        kind=OperationKind.CONVERSION,
        legs=legs,
        currency=Currency.USD,
        amount=usd_amount,
        intent={"user": user_id, "usd": usd_amount},
        actor_id=user_id,
        payer_id=user_id,
        description=f"{to_decimal(usd_amount)} USD → {to_decimal(tokens)} TOKEN",
    )
    return op


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
    legs = [
        Leg(await system_account(session, AccountKind.PROMOTIONS, Currency.COUPON), -coupon.amount),
        Leg(await user_account(session, user_id, Currency.COUPON), coupon.amount),
    ]
    op, created = await _record(
        session,
        key=key,
        kind=OperationKind.COUPON_REDEMPTION,
        legs=legs,
        currency=Currency.COUPON,
        amount=coupon.amount,
        intent={"coupon": coupon.id, "user": user_id},
        actor_id=user_id,
        payer_id=user_id,
        description=f"coupon {code}",
    )
    if created:
        session.add(CouponRedemption(coupon_id=coupon.id, user_id=user_id, operation_id=op.id))
        await session.flush()
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
            select(LedgerAccount.kind, LedgerAccount.currency, LedgerAccount.owner_id, Posting.amount)
            .join(LedgerAccount, LedgerAccount.id == Posting.account_id)
            .where(Posting.entry_id == original.entry_id)
        )
    ).all()
    legs: list[Leg] = []
    for kind, currency, owner, amount in rows:
        if kind == AccountKind.HELD:
            kind = AccountKind.AVAILABLE
        legs.append(
            Leg(
                await (
                    user_account(session, owner, currency)
                    if owner
                    else system_account(session, kind, currency)
                ),
                -amount,
            )
        )
    net: dict[uuid.UUID, int] = defaultdict(int)
    for leg in legs:
        net[leg.account.id] += leg.amount
    if not any(net.values()):  # e.g. a settlement of cost 0: it only released a hold
        raise BadRequest(
            f"Operation {original.id} moved no money between accounts; there is nothing to refund.",
            code="nothing_to_refund",
        )
    op, _ = await _record(
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
        refunds_operation_id=original.id,
        owner_income=-original.owner_income,
        description=(reason or f"refund of {original.kind.value}")[:500],
    )
    return op


# --------------------------------------------------------------------------- bills and statements


async def create_bill(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    amount: int,
    description: str = "",
    period: str | None = None,
    created_by: uuid.UUID | None = None,
) -> Bill:
    if amount <= 0:
        raise ValueError("a bill is positive")
    bill = Bill(
        user_id=user_id, amount=amount, description=description, period=period, created_by_id=created_by
    )
    session.add(bill)
    await session.flush()
    await audit.record(
        session,
        "billing.bill_created",
        f"bill {bill.id}: {to_decimal(amount)} USD",
        actor=created_by,
        subject_user_id=user_id,
        module=__name__,
        function="create_bill",
    )
    return bill


async def get_bill(session: AsyncSession, bill_id: uuid.UUID) -> Bill:
    bill = await session.get(Bill, bill_id)
    if bill is None:
        raise NotFound(f"Bill {bill_id} not found.")
    return bill


async def pay_bill(session: AsyncSession, bill: Bill, *, actor_id: uuid.UUID | None = None) -> Operation:
    """Pay an open bill from the user's USD balance (no coupons): once; 402 if unaffordable."""
    op = await charge(
        session,
        payer_id=bill.user_id,
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


async def statement(session: AsyncSession, user_id: uuid.UUID, period: str) -> dict[str, Any]:
    """Monthly statement: per currency opening/closing balance (available + held), money in and
    out; operations by kind; bills of the month."""
    start, end = month_bounds(period)
    own = select(LedgerAccount.id).where(LedgerAccount.owner_id == user_id).scalar_subquery()

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
    ops = await session.execute(
        select(Operation.kind, func.count(), func.sum(Operation.amount), Operation.currency)
        .where(Operation.payer_id == user_id, Operation.created_at >= start, Operation.created_at < end)
        .group_by(Operation.kind, Operation.currency)
    )
    bills = (
        (
            await session.execute(
                select(Bill).where(
                    Bill.user_id == user_id,
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
    }


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
) -> tuple[Sequence[Operation], int]:
    conditions: list[Any] = []
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
    total = (
        await session.execute(select(func.count()).select_from(Operation).where(*conditions))
    ).scalar_one()
    rows = (
        (
            await session.execute(
                select(Operation)
                .where(*conditions)
                .order_by(Operation.created_at.desc(), Operation.id)
                .limit(limit)
                .offset(offset)
            )
        )
        .scalars()
        .all()
    )
    return rows, int(total)


async def balances(session: AsyncSession, user_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await session.execute(
        select(LedgerAccount.currency, LedgerAccount.kind, LedgerAccount.balance).where(
            LedgerAccount.owner_id == user_id
        )
    )
    table: dict[Currency, dict[str, int]] = {c: {"available": 0, "held": 0} for c in Currency}
    for currency, kind, balance in rows:
        table[currency][kind.value] = int(balance)
    return [{"currency": c, **v} for c, v in table.items()]


async def available(session: AsyncSession, user_id: uuid.UUID, currency: Currency = Currency.USD) -> int:
    return await account_balance(session, await user_account(session, user_id, currency))
