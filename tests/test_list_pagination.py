"""Lists that grow page the same way: ``limit``/``offset`` and the total in ``X-Total-Count``
(docs/api.md, "Lists"). The OpenAPI walk checks every GET route answering a JSON array; the HTTP
tests check the header and the window on representative routes of each domain."""

from __future__ import annotations

from typing import Any

from flplatform.app import create_app
from flplatform.settings import Settings
from tests.inference.conftest import DropoutMLP, add_model  # noqa: F401  (fixture)
from tests.permissions.conftest import build_org_tree
from tests.training.conftest import create_training, upload_global

#: Lists that cannot grow: the price list is one row per price item.
FIXED_LISTS = {"/api/billing/prices/"}


def test_every_list_route_takes_limit_and_offset() -> None:
    spec = create_app(Settings(database_url="sqlite+aiosqlite:///unused.db")).openapi()
    lists, unpaged = [], []
    for path, operations in spec["paths"].items():
        get = operations.get("get")
        if get is None:
            continue
        body = get["responses"].get("200", {}).get("content", {}).get("application/json", {})
        if body.get("schema", {}).get("type") != "array" or path in FIXED_LISTS:
            continue
        lists.append(path)
        query = {p["name"]: p for p in get.get("parameters", []) if p["in"] == "query"}
        limit, offset = query.get("limit", {}).get("schema", {}), query.get("offset", {}).get("schema", {})
        if not (limit.get("minimum") == 1 and limit.get("maximum") == 1000 and offset.get("minimum") == 0):
            unpaged.append(path)
    assert len(lists) > 30 and not unpaged, unpaged


async def test_invitations_grants_coupons_and_bills_paginate(app, client, admin, alice, bob) -> None:
    tree = await build_org_tree(app, "pages", projects=0, groups=0, second=False)
    org_admin = tree.org_admin
    for _ in range(3):
        r = await client.post(
            f"/api/organizations/{tree.org.id}/invitations/", json={}, headers=org_admin.headers
        )
        assert r.status_code == 201
    page = await client.get(
        f"/api/organizations/{tree.org.id}/invitations/",
        params={"limit": 2, "offset": 2},
        headers=org_admin.headers,
    )
    assert page.status_code == 200 and page.headers["x-total-count"] == "3" and len(page.json()) == 1

    assert (
        await client.post("/api/broker/topics/", json={"slug": "paged"}, headers=alice.headers)
    ).status_code == 201
    for user in (bob, admin):
        r = await client.put(
            f"/api/broker/topics/paged/grants/{user.user.username}/",
            json={"can_consume": True},
            headers=alice.headers,
        )
        assert r.status_code == 200, r.text
    every = (await client.get("/api/broker/topics/paged/grants/", headers=alice.headers)).json()
    assert {bob.user.username, admin.user.username} <= {g["username"] for g in every}
    grants = await client.get(
        "/api/broker/topics/paged/grants/", params={"limit": 1, "offset": 1}, headers=alice.headers
    )
    assert grants.headers["x-total-count"] == str(len(every)) and grants.json() == every[1:2]

    for code in ("PAGE1", "PAGE2"):
        await client.post("/api/billing/coupons/", json={"code": code, "amount": "1"}, headers=admin.headers)
    coupons = await client.get("/api/billing/coupons/", params={"limit": 1}, headers=admin.headers)
    assert coupons.headers["x-total-count"] == "2" and len(coupons.json()) == 1
    for _ in range(2):
        await client.post(
            "/api/billing/bills/", json={"user_id": alice.id, "amount": "1"}, headers=admin.headers
        )
    bills = await client.get("/api/billing/bills/", params={"limit": 1, "offset": 1}, headers=alice.headers)
    assert bills.headers["x-total-count"] == "2" and len(bills.json()) == 1


async def _paged(client: Any, url: str, headers: dict[str, str], expected: int) -> list[Any]:
    """The whole list, then pages of one: the header says the total and the pages add up to it."""
    whole = await client.get(url, headers=headers)
    assert whole.status_code == 200, whole.text
    assert whole.headers["x-total-count"] == str(expected) == str(len(whole.json())), (url, whole.text)
    pages = []
    for offset in range(expected):
        page = await client.get(url, params={"limit": 1, "offset": offset}, headers=headers)
        assert page.headers["x-total-count"] == str(expected) and len(page.json()) == 1
        pages += page.json()
    assert pages == whole.json(), url
    beyond = await client.get(url, params={"offset": expected}, headers=headers)
    assert beyond.json() == [] and beyond.headers["x-total-count"] == str(expected)
    assert (await client.get(url, params={"limit": 0}, headers=headers)).status_code == 422
    return whole.json()


async def test_models_trainings_groups_tokens_and_roles_paginate(app, client, alice, add_model) -> None:  # noqa: F811
    for _ in range(3):
        await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    await _paged(client, "/api/models/", alice.headers, 3)
    for name in ("t1", "t2"):
        r = await client.post("/api/users/myself/tokens/", json={"name": name}, headers=alice.headers)
        assert r.status_code == 201, r.text
    tokens = await client.get("/api/users/myself/tokens/", headers=alice.headers)
    await _paged(client, "/api/users/myself/tokens/", alice.headers, len(tokens.json()))

    tree = await build_org_tree(app, "lists", projects=1, groups=2, second=False)
    member = tree.member_all
    await _paged(client, "/api/users/groups/", member.headers, 2)
    group = tree.groups[0][0]
    roles = await client.get(f"/api/collections/{group.id}/roles/", headers=tree.org_admin.headers)
    assert roles.status_code == 200, roles.text
    if roles.json():
        await _paged(client, f"/api/collections/{group.id}/roles/", tree.org_admin.headers, len(roles.json()))


async def test_trainings_and_their_models_paginate(client, alice, bob) -> None:
    trainings = []
    for _ in range(2):
        model_id = await upload_global(client, alice.headers)
        trainings.append(await create_training(client, alice.headers, model_id, [bob.id]))
    await _paged(client, "/api/trainings/", alice.headers, 2)
    await _paged(client, "/api/users/trainings/", bob.headers, 2)
    for suffix in ("models/", "models/latest/"):
        await _paged(client, f"/api/trainings/{trainings[0]}/{suffix}", alice.headers, 1)
