"""Charges for using models: inference requests (the price list's, or another owner's public model
at its market price with the owner credited in the same entry) and model copies; and the
per-model market pricing (``billing_model_pricing``)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.billing.ledger import Payer, get_account, payer_of, system_account
from flplatform.billing.money import basis_points
from flplatform.billing.operations import charge, object_id
from flplatform.billing.prices import get_prices
from flplatform.orm.billing import AccountKind, Currency, ModelPricing, Operation, OperationKind


def seller_of(model: Any) -> Payer:
    """Who earns from a model: its organisation when it has one, else its owner."""
    return Payer(model.owner_id, getattr(model, "organization_id", None))


async def seller_account(session: AsyncSession, model: Any, currency: Currency = Currency.USD) -> Any:
    seller = seller_of(model)
    if seller.organization_id is not None:
        return await get_account(
            session, AccountKind.AVAILABLE, currency, organization_id=seller.organization_id
        )
    return await get_account(session, AccountKind.AVAILABLE, currency, seller.user_id)


async def model_pricing(session: AsyncSession, model_id: uuid.UUID) -> ModelPricing | None:
    return await session.get(ModelPricing, model_id)


async def is_public_for_inference(session: AsyncSession, model_id: uuid.UUID) -> bool:
    """Whether other users may run (and pay for) inference on the model."""
    row = await session.get(ModelPricing, model_id)
    return row is not None and row.inference_public


async def set_model_pricing(
    session: AsyncSession,
    model_id: uuid.UUID,
    *,
    public: bool,
    price_per_sample: int,
    copy_allowed: bool | None = None,
    copy_price: int | None = None,
) -> ModelPricing:
    """Publish (or withdraw) a model on the market at a price per inferred sample, and allow
    copies at ``copy_price`` (fields left None keep their value)."""
    from flplatform.orm.base import utcnow

    row = await session.get(ModelPricing, model_id)
    if row is None:
        row = ModelPricing(model_id=model_id, copy_allowed=False, copy_price=0)
        session.add(row)
    if public and not row.inference_public:
        row.published_at = utcnow()
    row.inference_public, row.inference_price_per_sample = public, price_per_sample
    if copy_allowed is not None:
        row.copy_allowed = copy_allowed
    if copy_price is not None:
        row.copy_price = copy_price
    await session.flush()
    return row


async def charge_inference(
    session: AsyncSession, caller: Any, model: Any, samples: int, *, key: str | None = None
) -> Operation | None:
    """Charge one inference request of ``samples`` samples; call it BEFORE running the model.

    * the model is public with a price (``billing_model_pricing``) and belongs to someone else
      (another organisation, or in the organisation-less space another user): the caller pays
      price × samples, the seller (the model's organisation, else its owner) is credited that
      minus ``market_fee_bps``, the fee goes to revenue — one entry (kind ``inference_api``,
      the seed's "solving with API").
    * otherwise the caller pays the price list's ``inference_request`` + ``inference_sample`` ×
      samples to revenue (kind ``inference``).

    A member of an organisation pays from the organisation's accounts (within their spending
    limit). Coupons are spent before USD. Returns None when free. Raises 402 with nothing written
    when the caller cannot pay. ``key`` makes retries safe (default: a fresh key per call).
    """
    model_id, owner_id = object_id(model), getattr(model, "owner_id", None)
    payer = await payer_of(session, caller)
    key = key or f"inference:{uuid.uuid4()}"
    pricing = await model_pricing(session, model_id)
    seller = seller_of(model) if owner_id is not None else None
    if (
        seller is not None
        and seller.holder_id != payer.holder_id
        and pricing
        and pricing.inference_public
        and pricing.inference_price_per_sample
    ):
        prices = await get_prices(session)
        cost = pricing.inference_price_per_sample * max(samples, 1)
        fee = basis_points(cost, prices.amount("market_fee_bps"))
        recipients = [(await seller_account(session, model), cost - fee)]
        if fee:
            recipients.append((await system_account(session, AccountKind.REVENUE, Currency.USD), fee))
        return await charge(
            session,
            payer_id=payer.user_id,
            organization_id=payer.organization_id,
            amount=cost,
            kind=OperationKind.INFERENCE_API,
            key=key,
            recipients=recipients,
            model_id=model_id,
            model_owner_id=owner_id,
            model_organization_id=seller.organization_id,
            count_of_lines=samples,
            owner_income=cost - fee,
            description=f"inference on market model {model_id}",
        )
    prices = await get_prices(session)
    cost = prices.inference_cost(samples)
    if cost == 0:
        return None
    return await charge(
        session,
        payer_id=payer.user_id,
        organization_id=payer.organization_id,
        amount=cost,
        kind=OperationKind.INFERENCE,
        key=key,
        currency=prices.currency("inference_sample"),
        model_id=model_id,
        model_owner_id=owner_id,
        count_of_lines=samples,
        description=f"inference on model {model_id}",
    )


async def charge_model_copy(
    session: AsyncSession,
    caller: Any,
    model: Any,
    *,
    key: str,
    update: bool = False,
    round: int | None = None,
) -> list[Operation]:
    """Charge a model copy (``update``: a copy pulling a newer round, kind ``model_copy_update``).

    Two parts, each skipped when zero: the price list's ``model_copy`` (tokens by default, to
    revenue) and, when the caller copies someone else's model, the seller's ``copy_price`` in USD
    (the seller is credited it minus ``market_fee_bps``; coupons first). One key per part
    (``{key}`` and ``{key}:price``); 402 with nothing written when the payer cannot pay."""
    kind = OperationKind.MODEL_COPY_UPDATE if update else OperationKind.MODEL_COPY
    payer = await payer_of(session, caller)
    model_id, owner_id = object_id(model), getattr(model, "owner_id", None)
    seller = seller_of(model)
    common: dict[str, Any] = {
        "payer_id": payer.user_id,
        "organization_id": payer.organization_id,
        "kind": kind,
        "model_id": model_id,
        "model_owner_id": owner_id,
        "round": round,
    }
    ops: list[Operation] = []
    prices = await get_prices(session)
    cost = prices.amount("model_copy")
    if cost:
        ops.append(
            await charge(
                session,
                amount=cost,
                key=key,
                currency=prices.currency("model_copy"),
                allow_coupons=False,
                description=f"{kind.value} of model {model_id}",
                **common,
            )
        )
    pricing = await model_pricing(session, model_id)
    if seller.holder_id != payer.holder_id and pricing is not None and pricing.copy_price:
        price = pricing.copy_price
        fee = basis_points(price, prices.amount("market_fee_bps"))
        recipients = [(await seller_account(session, model), price - fee)]
        if fee:
            recipients.append((await system_account(session, AccountKind.REVENUE, Currency.USD), fee))
        ops.append(
            await charge(
                session,
                amount=price,
                key=f"{key}:price",
                recipients=recipients,
                model_organization_id=seller.organization_id,
                owner_income=price - fee,
                description=f"{kind.value} of market model {model_id}",
                **common,
            )
        )
    return ops
