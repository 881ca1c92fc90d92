"""A training run over HTTP charges the actor exactly as the price list says, once per round."""

from __future__ import annotations

import asyncio
from typing import Any

from flplatform import billing
from flplatform.orm.billing import OperationKind
from tests.billing.conftest import usd
from tests.training.conftest import (
    as_safetensors,
    create_training,
    post_update,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
    upload_global,
)


async def _wait(
    client: Any, headers: dict[str, str], training_id: str, cond: Any, timeout: float = 20.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = (await client.get(f"/api/trainings/{training_id}/", headers=headers)).json()
        if cond(body):
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)


async def _prices(books: Any) -> None:
    await books.price("training_update", usd(1))
    await books.price("training_sample_epoch", usd("0.01"))
    await books.price("training_reserve_samples", 100)  # reserve 1 + 0.01 × 100 = 2 per participant


async def test_a_sampled_round_holds_funds_for_the_clients_asked_only(client, alice, make_user, books):
    await _prices(books)
    await books.top_up(alice.user.id, usd(10))
    clients = [await make_user(f"s{i}", client=True) for i in range(3)]
    model_id = await upload_global(client, alice.headers, scripted_bytes(tiny_net()))
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        options={"skip_model_tests": True, "clients_per_round": 1, "seed": 7},
    )
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202, r.text
    # One client of three is asked: 2 USD held (1 + 0.01 × 100), not 6.
    assert await books.balance(alice.user.id, held=True) == usd(2)
    assert await books.balance(alice.user.id) == usd(8)


async def test_training_rounds_are_reserved_and_settled(client, alice, make_user, books):
    await _prices(books)
    await books.top_up(alice.user.id, usd(10))
    c1, c2 = await make_user("c1", client=True), await make_user("c2", client=True)
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client, alice.headers, model_id, [c1.id, c2.id], options={"skip_model_tests": True}
    )
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202, r.text
    assert await books.balance(alice.user.id) == usd(6) and await books.balance(
        alice.user.id, held=True
    ) == usd(4)
    state = state_of(initial)
    for round_ in range(2):
        for c, samples in ((c1, 30), (c2, 10)):
            r = await post_update(
                client, c.headers, model_id, as_safetensors(shifted(state, 0.1)), round_, samples
            )
            assert r.status_code == 201, r.text
        await _wait(
            client,
            alice.headers,
            training_id,
            lambda b, round_=round_: b["state"] == "C" or b["round"] == round_ + 1,
        )
    await _wait(client, alice.headers, training_id, lambda b: b["state"] == "C")
    per_round = 2 * usd(1) + usd("0.01") * 40  # two updates, 40 samples
    assert await books.balance(alice.user.id) == usd(10) - 2 * per_round
    assert await books.balance(alice.user.id, held=True) == 0
    ops, total = await books.run(
        lambda s: billing.list_operations(s, user_id=alice.user.id, kind=OperationKind.TRAINING)
    )
    assert total == 2 and sorted(op.round for op in ops) == [0, 1]
    assert all(op.amount == per_round and op.count_of_lines == 40 for op in ops)
    report = (await client.get(f"/api/billing/models/{model_id}/report/", headers=alice.headers)).json()
    assert report["training_cost"] == "4.80000000" and report["training_operations"] == 2
    assert (await books.reconcile()).ok


async def test_training_start_without_funds_is_402_and_nothing_starts(client, alice, make_user, books):
    await _prices(books)
    await books.top_up(alice.user.id, usd(3))
    c1, c2 = await make_user("c1", client=True), await make_user("c2", client=True)
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(client, alice.headers, model_id, [c1.id, c2.id])
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 402 and r.json()["code"] == "insufficient_funds"
    body = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert body["state"] == "I"
    assert await books.balance(alice.user.id) == usd(3) and await books.balance(alice.user.id, held=True) == 0


async def test_holds_of_stopped_trainings_are_released(client, alice, make_user, books, app):
    from flplatform.billing.hooks import release_ended_trainings

    await _prices(books)
    await books.top_up(alice.user.id, usd(5))
    c1 = await make_user("c1", client=True)
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(client, alice.headers, model_id, [c1.id])
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    assert await books.balance(alice.user.id, held=True) == usd(2)
    r = await client.post(f"/api/trainings/{training_id}/stop/", headers=alice.headers)
    assert r.status_code in (200, 202), r.text
    assert await books.run(release_ended_trainings) == 1
    assert await books.balance(alice.user.id) == usd(5) and await books.balance(alice.user.id, held=True) == 0
    assert (await books.reconcile()).ok


async def test_epochs_and_reserved_samples_from_the_training_options(client, alice, make_user, books):
    await books.price("training_update", usd(1))
    await books.price("training_sample_epoch", usd("0.01"))
    await books.top_up(alice.user.id, usd(10))
    c1, c2 = await make_user("c1", client=True), await make_user("c2", client=True)
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c1.id, c2.id],
        target_num_updates=1,
        options={"skip_model_tests": True, "epochs": 2, "billing_samples_per_update": 50},
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    # reserved per participant: 1 + 0.01 × 50 samples × 2 epochs = 2
    assert await books.balance(alice.user.id, held=True) == usd(4)
    state = state_of(initial)
    for c, samples in ((c1, 30), (c2, 10)):
        r = await post_update(client, c.headers, model_id, as_safetensors(shifted(state, 0.1)), 0, samples)
        assert r.status_code == 201, r.text
    await _wait(client, alice.headers, training_id, lambda b: b["state"] == "C")
    cost = 2 * usd(1) + usd("0.01") * 40 * 2
    assert await books.balance(alice.user.id) == usd(10) - cost
    assert await books.balance(alice.user.id, held=True) == 0
    ops, total = await books.run(
        lambda s: billing.list_operations(s, user_id=alice.user.id, kind=OperationKind.TRAINING)
    )
    assert total == 1 and ops[0].amount == cost and ops[0].count_of_training_epoch == 2
    r = await client.post(
        "/api/trainings/",
        headers=alice.headers,
        json={
            "model_id": model_id,
            "target_num_updates": 1,
            "aggregation_method": "FedAvg",
            "options": {"epochs": 0},
        },
    )
    assert r.status_code == 422
