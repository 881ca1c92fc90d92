"""Inference over HTTP is metered: 402 stops it, a public model pays its owner."""

from __future__ import annotations

from flplatform.orm.billing import OperationKind
from tests.billing.conftest import usd
from tests.inference.conftest import DropoutMLP, add_model  # noqa: F401  (fixture)

X = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]]


async def infer(client, account, model_id):
    return await client.post(
        "/api/inference/", json={"model_id": str(model_id), "model_input": X}, headers=account.headers
    )


async def test_public_model_inference_moves_money_from_caller_to_owner(client, alice, bob, add_model, books):  # noqa: F811
    model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    assert (await infer(client, bob, model_id)).status_code == 404  # private: not even visible
    r = await client.put(
        f"/api/billing/models/{model_id}/pricing/",
        json={"inference_public": True, "inference_price_per_sample": "0.25"},
        headers=alice.headers,
    )
    assert r.status_code == 200
    refused = await infer(client, bob, model_id)
    assert refused.status_code == 402 and refused.json()["code"] == "insufficient_funds"
    await books.top_up(bob.user.id, usd(1))
    ok = await infer(client, bob, model_id)
    assert ok.status_code == 200, ok.text
    assert await books.balance(bob.user.id) == usd("0.5")  # 2 samples × 0.25
    assert await books.balance(alice.user.id) == usd("0.45")  # minus the 10 % platform fee
    ops = (await client.get("/api/billing/operations/?kind=inference_api", headers=alice.headers)).json()
    assert len(ops) == 1 and ops[0]["count_of_lines"] == 2 and ops[0]["owner_income"] == "0.45000000"
    earnings = (await client.get("/api/billing/earnings/", headers=alice.headers)).json()
    assert earnings == [
        {
            "model_id": str(model_id),
            "currency": "USD",
            "sales": 1,
            "gross": "0.50000000",
            "earnings": "0.45000000",
        }
    ]
    assert (await client.get("/api/billing/earnings/", headers=bob.headers)).json() == []
    assert (await books.reconcile()).ok


async def test_own_model_inference_charges_price_list_and_402_runs_nothing(client, alice, add_model, books):  # noqa: F811
    model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    assert (await infer(client, alice, model_id)).status_code == 200  # free by default
    await books.price("inference_sample", usd("0.1"))
    refused = await infer(client, alice, model_id)
    assert refused.status_code == 402
    cache = client._transport.app.state.inference_runtime.cache
    hits = cache.hits
    await books.top_up(alice.user.id, usd("0.2"))
    assert (await infer(client, alice, model_id)).status_code == 200
    assert cache.hits == hits + 1  # the refused call never reached the model
    assert await books.balance(alice.user.id) == 0
    from flplatform import billing

    _, total = await books.run(
        lambda s: billing.list_operations(s, user_id=alice.user.id, kind=OperationKind.INFERENCE)
    )
    assert total == 1
