"""The market over HTTP: organisation A publishes a model; a member of organisation B finds it,
reads its metadata, calls it (``inference_api``, paid from B's account, A credited), copies it
(``model_copy``) and pulls a newer round (``model_copy_update``); A's admin sees the earnings."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from flplatform.orm import GlobalModel, GlobalModelRound
from flplatform.orm.base import utcnow
from flplatform.orm.billing import ModelCopy
from tests.inference.conftest import DropoutMLP, add_model  # noqa: F401  (fixture)
from tests.permissions.conftest import build_org_tree

X = [[0.1, 0.2, 0.3, 0.4]]


async def test_buyer_finds_calls_and_copies_a_published_model(app, client, books, add_model) -> None:  # noqa: F811
    tree = await build_org_tree(app, "mk", projects=1, groups=1)
    seller_admin, seller = tree.org_admin, tree.project_coach
    buyer, buyer_admin, root = tree.other.actors["member_one"], tree.other_admin, tree.superuser
    model_id = str(await add_model(seller, DropoutMLP(), input_shape=[None, 4]))

    # Unpublished: invisible to B.
    assert (await client.get("/api/market/models/", headers=buyer.headers)).json() == []
    assert (await client.get(f"/api/models/{model_id}/metadata/", headers=buyer.headers)).status_code == 404
    assert (
        await client.post(f"/api/models/{model_id}/copy/", json={}, headers=buyer.headers)
    ).status_code == 404

    # Publishing is the owner's or the org admin's decision (a plain member of A: 404, B: 404).
    pricing = {
        "inference_public": True,
        "inference_price_per_sample": "0.25",
        "copy_allowed": True,
        "copy_price": "1",
    }
    url = f"/api/billing/models/{model_id}/pricing/"
    assert (await client.put(url, json=pricing, headers=buyer_admin.headers)).status_code == 404
    r = await client.put(url, json=pricing, headers=seller_admin.headers)
    assert r.status_code == 200 and r.json()["copy_price"] == "1.00000000", r.text

    listed = await client.get("/api/market/models/", headers=buyer.headers)
    assert listed.status_code == 200 and listed.headers["x-total-count"] == "1"
    (card,) = listed.json()
    assert card["id"] == model_id and card["organization_name"] == tree.org.name
    assert card["price_per_sample"] == "0.25000000" and card["input_shape"] == [None, 4]
    assert {"NONE", "MC_DROPOUT"} <= set(card["uncertainty_methods"]) and card["copy_allowed"]
    for params in ({"q": "no-such-model"}, {"max_price": "0.1"}, {"uncertainty_method": "SWAG"}):
        assert (await client.get("/api/market/models/", params=params, headers=buyer.headers)).json() == [], (
            params
        )
    assert (
        len((await client.get("/api/market/models/", params={"sort": "price"}, headers=buyer.headers)).json())
        == 1
    )
    assert (await client.get(f"/api/market/models/{model_id}/", headers=buyer.headers)).status_code == 200
    meta = await client.get(f"/api/models/{model_id}/metadata/", headers=buyer.headers)
    assert meta.status_code == 200 and meta.json()["input_shape"] == [None, 4]

    # B pays from its organisation's account; A's organisation is credited.
    await client.post(
        "/api/billing/top-ups/",
        json={"organization_id": str(tree.other.org.id), "amount": "5"},
        headers=root.headers,
    )
    r = await client.post(
        "/api/inference/", json={"model_id": model_id, "model_input": X}, headers=buyer.headers
    )
    assert r.status_code == 200, r.text
    b_base, a_base = (
        f"/api/organizations/{tree.other.org.id}/billing",
        f"/api/organizations/{tree.org.id}/billing",
    )
    ops = (
        await client.get(
            f"{b_base}/operations/", params={"kind": "inference_api"}, headers=buyer_admin.headers
        )
    ).json()
    assert len(ops) == 1 and ops[0]["payer_id"] == buyer.id and ops[0]["amount"] == "0.25000000"
    seen_by_a = await client.get(
        f"{a_base}/operations/", params={"kind": "inference_api"}, headers=seller_admin.headers
    )
    assert seen_by_a.headers["x-total-count"] == "1"
    detail = await client.get(f"/api/billing/operations/{ops[0]['id']}/", headers=seller_admin.headers)
    assert detail.status_code == 200  # A's admin reads the sale's postings

    # The copy: a new model in B, the same blob, charged model_copy (the copy price to A).
    r = await client.post(f"/api/models/{model_id}/copy/", json={"name": "bought"}, headers=buyer.headers)
    assert r.status_code == 201, r.text
    copied = r.json()
    assert [op["kind"] for op in copied["operations"]] == ["model_copy"] and copied["source_round"] == 0
    assert (
        await client.get(f"/api/models/{copied['model_id']}/info/", headers=buyer.headers)
    ).status_code == 200
    async with app.state.sessionmaker() as session:
        source = await session.get(GlobalModel, uuid.UUID(model_id))
        copy = await session.get(GlobalModel, uuid.UUID(copied["model_id"]))
        assert copy.weights_digest == source.weights_digest and copy.organization_id == tree.other.org.id
        # The source moves on: a newer round the copy may pull.
        source.round = 1
        session.add(
            GlobalModelRound(
                model_id=source.id,
                round=1,
                weights_digest=source.weights_digest,
                weights_format=source.weights_format,
                weights_size=source.weights_size,
            )
        )
        await session.commit()
    r = await client.post(f"/api/models/{copied['model_id']}/pull/", json={}, headers=buyer.headers)
    assert r.status_code == 200 and r.json()["source_round"] == 1 and r.json()["round"] == 1, r.text
    assert [op["kind"] for op in r.json()["operations"]] == ["model_copy_update"]
    again = await client.post(f"/api/models/{copied['model_id']}/pull/", json={}, headers=buyer.headers)
    assert again.status_code == 409 and again.json()["code"] == "copy_up_to_date"
    async with app.state.sessionmaker() as session:
        link = await session.get(ModelCopy, uuid.UUID(copied["model_id"]))
        assert link.source_model_id == source.id and link.source_round == 1
        rounds = (
            await session.scalars(select(GlobalModelRound.round).where(GlobalModelRound.model_id == copy.id))
        ).all()
        assert sorted(rounds) == [0, 1]

    # A's earnings per model for the month: 0.25 + 1 + 1 gross, minus the 10 % fee.
    period = utcnow().strftime("%Y-%m")
    earnings = (
        await client.get(f"{a_base}/earnings/", params={"period": period}, headers=seller_admin.headers)
    ).json()
    assert earnings == [
        {"model_id": model_id, "currency": "USD", "sales": 3, "gross": "2.25000000", "earnings": "2.02500000"}
    ]
    balance = (await client.get(f"{b_base}/balance/", headers=buyer_admin.headers)).json()
    assert {"currency": "USD", "available": "2.75000000", "held": "0.00000000"} in balance["balances"]

    # Withdrawn: gone from the market, no metadata, no copies.
    withdrawn = {"inference_public": False, "inference_price_per_sample": "0", "copy_allowed": False}
    assert (await client.put(url, json=withdrawn, headers=seller.headers)).status_code == 200
    assert (await client.get("/api/market/models/", headers=buyer.headers)).json() == []
    assert (await client.get(f"/api/models/{model_id}/metadata/", headers=buyer.headers)).status_code == 404
    assert (
        await client.post(f"/api/models/{model_id}/copy/", json={}, headers=buyer.headers)
    ).status_code == 404
    # The owner still copies their own model.
    own = await client.post(f"/api/models/{model_id}/copy/", json={}, headers=seller.headers)
    assert own.status_code == 201 and own.json()["operations"] == []
    assert (await books.reconcile()).ok
