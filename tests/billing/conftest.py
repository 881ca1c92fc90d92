"""Billing test helpers: run services in their own committed session, read ledger state."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from flplatform import billing
from flplatform.billing import ledger
from flplatform.billing.money import to_minor
from flplatform.billing.prices import set_price
from flplatform.orm import GlobalModel
from flplatform.orm.billing import Currency, Posting


def usd(value: str | int) -> int:
    return to_minor(Decimal(str(value)))


class Ledger:
    """Committed service calls and ledger reads against the test app's database."""

    def __init__(self, app: Any):
        self.app = app

    async def run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        async with self.app.state.sessionmaker() as session:
            result = await fn(session, *args, **kwargs)
            await session.commit()
            return result

    async def top_up(self, user_id: uuid.UUID, amount: int, currency: Currency = Currency.USD) -> Any:
        return await self.run(
            lambda s: billing.top_up(
                s, user_id=user_id, amount=amount, currency=currency, key=f"t:{uuid.uuid4()}"
            )
        )

    async def coupon(self, user_id: uuid.UUID, amount: int) -> Any:
        code = f"C{uuid.uuid4().hex[:10]}"
        await self.run(lambda s: billing.create_coupon(s, code=code, amount=amount))
        return await self.run(lambda s: billing.redeem_coupon(s, user_id=user_id, code=code))

    async def price(self, item: str, amount: int) -> None:
        await self.run(lambda s: set_price(s, item, amount, by=None))

    async def balance(
        self, user_id: uuid.UUID, currency: Currency = Currency.USD, *, held: bool = False
    ) -> int:
        async def read(s: Any) -> int:
            rows = await ledger.balances_of(s, user_id)
            from flplatform.orm.billing import AccountKind

            return rows.get((currency, AccountKind.HELD if held else AccountKind.AVAILABLE), 0)

        return await self.run(read)

    async def system(self, kind: Any, currency: Currency = Currency.USD) -> int:
        async def read(s: Any) -> int:
            return await ledger.account_balance(s, await ledger.system_account(s, kind, currency))

        return await self.run(read)

    async def postings(self, entry_id: uuid.UUID) -> dict[str, int]:
        return dict(await self.run(lambda s: ledger.postings_of(s, entry_id)))

    async def total_by_currency(self) -> dict[str, int]:
        async def read(s: Any) -> dict[str, int]:
            rows = await s.execute(
                select(Posting.currency, func.sum(Posting.amount)).group_by(Posting.currency)
            )
            return {str(c): int(t) for c, t in rows}

        return await self.run(read)

    async def reconcile(self) -> ledger.Reconciliation:
        return await self.run(ledger.reconcile)

    async def model(self, owner_id: uuid.UUID, name: str = "m") -> GlobalModel:
        async def make(s: Any) -> GlobalModel:
            model = GlobalModel(owner_id=owner_id, name=name)
            s.add(model)
            await s.flush()
            return model

        return await self.run(make)


@pytest.fixture
def books(app: Any) -> Ledger:
    return Ledger(app)
