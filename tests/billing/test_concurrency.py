"""Real concurrency on PostgreSQL: independent sessions, real commits, row locks."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from flplatform import billing
from flplatform.billing.ledger import InsufficientFunds
from flplatform.orm.billing import OperationKind
from tests.billing.conftest import usd

pytestmark = pytest.mark.postgres_only


async def _attempt(books, coro_factory):
    try:
        await books.run(coro_factory)
        return True
    except InsufficientFunds:
        return False


async def test_parallel_debits_never_overdraw(books, alice):
    balance, price, attempts = usd("10.5"), usd(1), 25
    await books.top_up(alice.user.id, balance)
    results = await asyncio.gather(
        *[
            _attempt(
                books,
                lambda s, i=i: billing.charge(
                    s, payer_id=alice.user.id, amount=price, kind=OperationKind.MODEL_COPY, key=f"storm:{i}"
                ),
            )
            for i in range(attempts)
        ]
    )
    assert sum(results) == balance // price == 10
    assert await books.balance(alice.user.id) == balance - 10 * price >= 0
    assert await books.total_by_currency() == {"USD": 0}
    assert (await books.reconcile()).ok


async def test_parallel_holds_and_coupon_spends_never_overdraw(books, alice):
    await books.top_up(alice.user.id, usd(3))
    await books.coupon(alice.user.id, usd(2))
    results = await asyncio.gather(
        *[
            _attempt(
                books,
                lambda s, i=i: billing.reserve(s, owner_id=alice.user.id, amount=usd(1), key=f"hold:{i}"),
            )
            for i in range(12)
        ]
    )
    assert sum(results) == 5
    assert await books.balance(alice.user.id) == 0
    assert (await books.reconcile()).ok


async def test_same_key_in_parallel_is_one_operation(books, alice):
    await books.top_up(alice.user.id, usd(10))
    ops = await asyncio.gather(
        *[
            books.run(
                lambda s: billing.charge(
                    s, payer_id=alice.user.id, amount=usd(3), kind=OperationKind.MODEL_COPY, key="one-key"
                )
            )
            for _ in range(10)
        ]
    )
    assert len({op.id for op in ops}) == 1
    assert await books.balance(alice.user.id) == usd(7)


async def test_same_idempotency_key_over_http_in_parallel(client, books, alice):
    await books.top_up(alice.user.id, usd(10))
    headers = {**alice.headers, "Idempotency-Key": str(uuid.uuid4())}
    responses = await asyncio.gather(
        *[
            client.post("/api/billing/conversions/", json={"usd_amount": "4"}, headers=headers)
            for _ in range(8)
        ]
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert await books.balance(alice.user.id) == usd(6)
    ops, total = await books.run(
        lambda s: billing.list_operations(s, user_id=alice.user.id, kind=OperationKind.CONVERSION)
    )
    assert total == 1


async def test_opposite_market_payments_do_not_deadlock(books, alice, bob):
    model_a, model_b = await books.model(alice.user.id, "a"), await books.model(bob.user.id, "b")
    for model in (model_a, model_b):
        await books.run(
            lambda s, m=model: billing.set_model_pricing(s, m.id, public=True, price_per_sample=usd(1))
        )
    await books.top_up(alice.user.id, usd(20))
    await books.top_up(bob.user.id, usd(20))
    calls = []
    for i in range(10):
        calls.append(
            books.run(lambda s, i=i: billing.charge_inference(s, alice.user, model_b, 1, key=f"ab{i}"))
        )
        calls.append(
            books.run(lambda s, i=i: billing.charge_inference(s, bob.user, model_a, 1, key=f"ba{i}"))
        )
    await asyncio.wait_for(asyncio.gather(*calls), timeout=60)
    # Each paid 10 and earned 9 (10 % fee): 19 left.
    assert await books.balance(alice.user.id) == await books.balance(bob.user.id) == usd(19)
    assert (await books.reconcile()).ok
