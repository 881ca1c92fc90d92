"""The price list: code defaults, overridden per item by the admin-editable ``billing_prices``
table. Money items are minor units (10⁻⁸) of their currency; ``market_fee_bps`` and
``token_per_usd`` are plain numbers. Every default price is 0, so a fresh platform bills
nothing until an administrator sets prices."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import audit
from flplatform.billing.money import to_minor
from flplatform.errors import NotFound, Unprocessable
from flplatform.orm.base import utcnow
from flplatform.orm.billing import Currency, Price


@dataclass(frozen=True)
class PriceItem:
    item: str
    amount: int
    currency: Currency | None
    description: str


DEFAULTS: dict[str, PriceItem] = {
    p.item: p
    for p in (
        PriceItem("training_update", 0, Currency.USD, "per participant update in each training round"),
        PriceItem(
            "training_sample_epoch",
            0,
            Currency.USD,
            "per sample × epoch of a participant update (seed: count_of_lines × count_of_training_epoch)",
        ),
        PriceItem(
            "training_reserve_samples",
            10_000,
            None,
            "samples per participant update reserved when a round starts; the sample-priced part of a "
            "round is billed up to this reservation",
        ),
        PriceItem(
            "inference_request", 0, Currency.USD, "per inference request on a model the caller may use"
        ),
        PriceItem("inference_sample", 0, Currency.USD, "per inferred sample on a model the caller may use"),
        PriceItem("model_copy", 0, Currency.TOKEN, "per model copy (a premium feature paid in tokens)"),
        PriceItem("market_fee_bps", 1000, None, "platform fee on public-model inference, in basis points"),
        PriceItem("token_per_usd", 100, None, "tokens received per USD converted"),
    )
}


@dataclass(frozen=True)
class Prices:
    items: dict[str, PriceItem]

    def amount(self, item: str) -> int:
        return self.items[item].amount

    def currency(self, item: str) -> Currency:
        currency = self.items[item].currency
        assert currency is not None
        return currency

    def training_update_cost(self, samples: int, epochs: int) -> int:
        return self.amount("training_update") + self.amount("training_sample_epoch") * max(samples, 0) * max(
            epochs, 1
        )

    def inference_cost(self, samples: int) -> int:
        return self.amount("inference_request") + self.amount("inference_sample") * max(samples, 0)


async def get_prices(session: AsyncSession) -> Prices:
    items = dict(DEFAULTS)
    for row in (await session.execute(select(Price))).scalars():
        if row.item in items:
            items[row.item] = PriceItem(row.item, row.amount, row.currency, DEFAULTS[row.item].description)
    return Prices(items)


async def set_price(session: AsyncSession, item: str, amount: int, *, by: uuid.UUID | None) -> PriceItem:
    if item not in DEFAULTS:
        raise NotFound(f"No price item {item!r}; known items: {', '.join(DEFAULTS)}.")
    if amount < 0:
        raise ValueError("prices are not negative")
    row = await session.get(Price, item)
    if row is None:
        row = Price(item=item, amount=amount, currency=DEFAULTS[item].currency, updated_by_id=by)
        session.add(row)
    else:
        row.amount, row.updated_by_id, row.updated_at = amount, by, utcnow()
    await session.flush()
    return PriceItem(item, amount, DEFAULTS[item].currency, DEFAULTS[item].description)


async def change_price(session: AsyncSession, item: str, amount: Decimal, *, admin: Any) -> PriceItem:
    """An administrator's price change, audited: money items take a decimal amount of their
    currency, ``market_fee_bps`` and ``token_per_usd`` an integer (422 otherwise)."""
    default = DEFAULTS.get(item)
    if default is None:
        raise NotFound(f"No price item {item!r}; known items: {', '.join(DEFAULTS)}.")
    if default.currency is None and amount != amount.to_integral_value():
        raise Unprocessable(f"{item} is an integer.")
    price = await set_price(session, item, to_minor(amount) if default.currency else int(amount), by=admin.id)
    await audit.record(session, "billing.price_set", f"{item} = {amount}", actor=admin)
    return price
