"""Charges for using models: inference requests (the price list's, or another owner's public model
at its market price with the owner credited in the same entry) and model copies; and the
per-model market pricing (``billing_model_pricing``)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.billing.ledger import system_account, user_account
from flplatform.billing.money import basis_points
from flplatform.billing.operations import charge, object_id
from flplatform.billing.prices import get_prices
from flplatform.orm.billing import AccountKind, Currency, ModelPricing, Operation, OperationKind


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
    caller_id, model_id, owner_id = object_id(caller), object_id(model), getattr(model, "owner_id", None)
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
        payer_id=object_id(caller),
        amount=cost,
        kind=OperationKind.MODEL_COPY,
        key=key,
        currency=prices.currency("model_copy"),
        allow_coupons=False,
        model_id=object_id(model),
        model_owner_id=getattr(model, "owner_id", None),
    )
