"""Lists that grow page the same way: ``limit``/``offset`` and the total in ``X-Total-Count``
(invitation links, topic grants, coupons, bills)."""

from __future__ import annotations

from tests.permissions.conftest import build_org_tree


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
