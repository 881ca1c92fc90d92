"""Concurrent storms through the HTTP metering path (PostgreSQL: real row locks): inference
requests racing for one balance never overdraw it, and a market storm pays the owner exactly."""

from __future__ import annotations

import asyncio

import pytest

from tests.billing.conftest import usd
from tests.inference.conftest import DropoutMLP, add_model  # noqa: F401  (fixture)

pytestmark = pytest.mark.postgres_only

ROW = [[0.1, 0.2, 0.3, 0.4]]


async def _infer(client, account, model_id):
    return await client.post(
        "/api/inference/", json={"model_id": str(model_id), "model_input": ROW}, headers=account.headers
    )


async def test_inference_storm_on_own_model_never_overdraws(client, alice, add_model, books):  # noqa: F811
    model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    await books.price("inference_sample", usd("0.1"))
    await books.top_up(alice.user.id, usd("0.55"))
    responses = await asyncio.gather(*[_infer(client, alice, model_id) for _ in range(12)])
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 5 + [402] * 7, codes
    assert await books.balance(alice.user.id) == usd("0.05")
    assert await books.total_by_currency() == {"USD": 0}
    assert (await books.reconcile()).ok


async def test_market_storm_pays_the_owner_for_exactly_the_answered_requests(
    client,
    make_user,
    alice,
    bob,
    add_model,
    books,  # noqa: F811
):
    carol = await make_user("carol")
    model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    r = await client.put(
        f"/api/billing/models/{model_id}/pricing/",
        json={"inference_public": True, "inference_price_per_sample": "0.2"},
        headers=alice.headers,
    )
    assert r.status_code == 200, r.text
    await books.top_up(bob.user.id, usd("0.7"))  # 3 requests
    await books.top_up(carol.user.id, usd("0.5"))  # 2 requests
    responses = await asyncio.gather(*[_infer(client, who, model_id) for who in (bob, carol) * 5])
    answered = sum(r.status_code == 200 for r in responses)
    assert answered == 5 and all(r.status_code in (200, 402) for r in responses)
    assert await books.balance(bob.user.id) == usd("0.1") and await books.balance(carol.user.id) == usd("0.1")
    assert await books.balance(alice.user.id) == 5 * usd("0.18")  # 0.2 minus the 10 % platform fee
    assert (await books.reconcile()).ok
