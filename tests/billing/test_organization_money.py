"""An organisation's own money over HTTP: its admin funds it, members spend from it within the
limits the admin sets (402 past them), the admin reads its balance, operations, statement and
audit log; members see only their own spending; another organisation sees none of it."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from flplatform import billing
from flplatform.orm.base import utcnow
from flplatform.orm.billing import Currency
from tests.billing.conftest import usd
from tests.inference.conftest import DropoutMLP, add_model  # noqa: F401  (fixture)
from tests.permissions.conftest import build_org_tree

X = [[0.1, 0.2, 0.3, 0.4]]


async def infer(client: Any, actor: Any, model_id: Any) -> Any:
    return await client.post(
        "/api/inference/", json={"model_id": str(model_id), "model_input": X}, headers=actor.headers
    )


async def test_org_admin_funds_members_spend_within_limits(app, client, books, add_model) -> None:  # noqa: F811
    tree = await build_org_tree(app, "money", projects=1, groups=1)
    admin, m1, m2, other = tree.org_admin, tree.member_one, tree.member_all, tree.other_admin
    base = f"/api/organizations/{tree.org.id}/billing"

    # The admin funds the organisation from their own balance (402 beyond it).
    await books.top_up(admin.user.id, usd(10))
    r = await client.post(f"{base}/top-ups/", json={"amount": "20"}, headers=admin.headers)
    assert r.status_code == 402, r.text
    r = await client.post(f"{base}/top-ups/", json={"amount": "6"}, headers=admin.headers)
    assert r.status_code == 201, r.text
    assert r.json()["organization_id"] == str(tree.org.id) and r.json()["kind"] == "top_up"
    assert await books.balance(admin.user.id) == usd(4)
    balance = (await client.get(f"{base}/balance/", headers=admin.headers)).json()
    assert {"currency": "USD", "available": "6.00000000", "held": "0.00000000"} in balance["balances"]
    assert (await client.get(f"{base}/balance/", headers=m1.headers)).status_code == 403
    assert (await client.get(f"{base}/balance/", headers=other.headers)).status_code == 404
    assert (
        await client.post(f"{base}/top-ups/", json={"amount": "1"}, headers=m1.headers)
    ).status_code == 403

    # Limits: 1 USD a month each; only the admin sets them.
    for member in (m1, m2):
        r = await client.put(f"{base}/limits/{member.id}/", json={"amount": "1"}, headers=admin.headers)
        assert r.status_code == 200 and r.json()["amount"] == "1.00000000", r.text
    assert (
        await client.put(f"{base}/limits/{m2.id}/", json={"amount": "9"}, headers=m1.headers)
    ).status_code == 403
    assert (
        await client.put(f"{base}/limits/{other.id}/", json={"amount": "9"}, headers=admin.headers)
    ).status_code == 404  # not a member of this organisation
    listed = await client.get(f"{base}/limits/", headers=admin.headers)
    assert listed.headers["x-total-count"] == "2"

    # Members spend from the organisation, not from their (empty) own balances.
    await books.price("inference_request", usd("0.5"))
    model1 = await add_model(m1, DropoutMLP(), input_shape=[None, 4])
    model2 = await add_model(m2, DropoutMLP(), input_shape=[None, 4])
    assert (await infer(client, m1, model1)).status_code == 200
    assert (await infer(client, m1, model1)).status_code == 200
    refused = await infer(client, m1, model1)
    assert refused.status_code == 402 and refused.json()["code"] == "spending_limit_exceeded", refused.text
    assert (await infer(client, m2, model2)).status_code == 200
    assert await books.balance(m1.user.id) == 0 == await books.balance(m2.user.id)
    balance = (await client.get(f"{base}/balance/", headers=admin.headers)).json()
    assert {"currency": "USD", "available": "4.50000000", "held": "0.00000000"} in balance["balances"]

    # The admin's views: operations by member and kind, paginated.
    ops = await client.get(f"{base}/operations/", headers=admin.headers)
    assert ops.status_code == 200 and ops.headers["x-total-count"] == "4"  # top-up + 3 inferences
    by_m1 = await client.get(f"{base}/operations/", params={"user_id": m1.id}, headers=admin.headers)
    assert by_m1.headers["x-total-count"] == "2" and {o["payer_id"] for o in by_m1.json()} == {m1.id}
    page = await client.get(
        f"{base}/operations/", params={"kind": "inference", "limit": 2, "offset": 2}, headers=admin.headers
    )
    assert page.headers["x-total-count"] == "3" and len(page.json()) == 1
    # A member sees only their own spending.
    mine = await client.get(f"{base}/operations/", headers=m1.headers)
    assert mine.headers["x-total-count"] == "2"
    assert (
        await client.get(f"{base}/operations/", params={"user_id": m2.id}, headers=m1.headers)
    ).status_code == 403
    spending = (await client.get(f"{base}/members/{m1.id}/spending/", headers=m1.headers)).json()
    usd_line = next(line for line in spending["spending"] if line["currency"] == "USD")
    assert usd_line == {
        "currency": "USD",
        "spent": "1.00000000",
        "limit": "1.00000000",
        "remaining": "0.00000000",
    }
    assert (await client.get(f"{base}/members/{m2.id}/spending/", headers=m1.headers)).status_code == 403
    assert (await client.get(f"{base}/members/{m2.id}/spending/", headers=admin.headers)).status_code == 200

    # Raising the limit lets the member spend again.
    await client.put(f"{base}/limits/{m1.id}/", json={"amount": "2"}, headers=admin.headers)
    assert (await infer(client, m1, model1)).status_code == 200

    # The monthly statement and the audit log.
    period = utcnow().strftime("%Y-%m")
    statement = await client.get(f"{base}/statements/{period}/", headers=admin.headers)
    assert statement.status_code == 200, statement.text
    body = statement.json()
    usd_row = next(c for c in body["currencies"] if c["currency"] == "USD")
    assert usd_row["opening"] == "0.00000000" and usd_row["closing"] == "4.00000000"
    assert usd_row["money_in"] == "6.00000000" and usd_row["money_out"] == "2.00000000"
    members = {(line["user_id"], line["kind"]): line for line in body["members"]}
    assert (
        members[(m1.id, "inference")]["count"] == 3
        and members[(m2.id, "inference")]["amount"] == "0.50000000"
    )
    assert (await client.get(f"{base}/statements/{period}/", headers=m1.headers)).status_code == 403
    log = await client.get(f"{base}/audit-log/", params={"action": "billing."}, headers=admin.headers)
    actions = {row["action"] for row in log.json()}
    assert {"billing.top_up", "billing.inference", "billing.spending_limit"} <= actions, actions
    assert all(row["organisation_id"] == str(tree.org.id) for row in log.json())
    assert (await client.get(f"{base}/audit-log/", headers=m1.headers)).status_code == 403

    # Another organisation's admin sees none of it.
    for path in (
        "balance/",
        "operations/",
        f"statements/{period}/",
        "audit-log/",
        "limits/",
        "bills/",
        "earnings/",
    ):
        assert (await client.get(base + "/" + path, headers=other.headers)).status_code == 404, path
    other_base = f"/api/organizations/{tree.other.org.id}/billing"
    other_log = await client.get(f"{other_base}/audit-log/", headers=other.headers)
    assert other_log.status_code == 200 and other_log.json() == []
    assert (await books.reconcile()).ok


async def test_org_bill_is_paid_from_the_organisation(app, client, books) -> None:
    tree = await build_org_tree(app, "bill", projects=0, groups=0, second=False)
    admin, root = tree.org_admin, tree.superuser
    base = f"/api/organizations/{tree.org.id}/billing"
    r = await client.post(
        "/api/billing/top-ups/",
        json={"organization_id": str(tree.org.id), "amount": "3"},
        headers=root.headers,
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/api/billing/bills/", json={"organization_id": str(tree.org.id), "amount": "2"}, headers=root.headers
    )
    assert r.status_code == 201, r.text
    bill = r.json()
    bills = await client.get(f"{base}/bills/", params={"status": "open"}, headers=admin.headers)
    assert bills.headers["x-total-count"] == "1" and bills.json()[0]["id"] == bill["id"]
    assert (
        await client.post(f"{base}/bills/{bill['id']}/pay/", headers=tree.member_one.headers)
    ).status_code == 403
    paid = await client.post(f"{base}/bills/{bill['id']}/pay/", headers=admin.headers)
    assert paid.status_code == 200 and paid.json()["status"] == "paid", paid.text
    balance = (await client.get(f"{base}/balance/", headers=admin.headers)).json()
    assert {"currency": "USD", "available": "1.00000000", "held": "0.00000000"} in balance["balances"]
    # The organisation buys tokens with its USD (an admin's decision).
    conversion = {"usd_amount": "0.5"}
    assert (
        await client.post(f"{base}/conversions/", json=conversion, headers=tree.member_one.headers)
    ).status_code == 403
    converted = await client.post(f"{base}/conversions/", json=conversion, headers=admin.headers)
    assert converted.status_code == 201 and converted.json()["organization_id"] == str(tree.org.id), (
        converted.text
    )
    balance = (await client.get(f"{base}/balance/", headers=admin.headers)).json()["balances"]
    assert {"currency": "USD", "available": "0.50000000", "held": "0.00000000"} in balance
    assert {"currency": "TOKEN", "available": "50.00000000", "held": "0.00000000"} in balance
    # An organisation holding money is not deleted.
    gone = await client.delete(f"/api/organizations/{tree.org.id}/", headers=root.headers)
    assert gone.status_code == 409
    assert (await books.reconcile()).ok


async def test_member_training_rounds_and_refunds_use_the_organisation(app, books) -> None:
    tree = await build_org_tree(app, "rounds", projects=0, groups=0, second=False)
    org, coach = tree.org.id, tree.project_coach.user
    await books.run(lambda s: billing.top_up(s, organization_id=org, amount=usd(5), key="fund-rounds"))
    await books.price("training_update", usd(1))
    training = SimpleNamespace(id=uuid.uuid4(), actor_id=coach.id, options={}, model_id=None)

    async def org_usd(s: Any) -> tuple[int, int]:
        line = next(
            b for b in await billing.balances(s, org, organization=True) if b["currency"] == Currency.USD
        )
        return line["available"], line["held"]

    hold = await books.run(lambda s: billing.reserve_round(s, training, 1, ["p1", "p2"]))
    assert hold.organization_id == org and hold.owner_id == coach.id
    assert await books.run(org_usd) == (usd(3), usd(2))
    op = await books.run(lambda s: billing.settle_round(s, training, 1, [("p1", 10)]))
    assert op.organization_id == org and op.payer_id == coach.id and op.amount == usd(1)
    assert await books.run(org_usd) == (usd(4), 0)
    refund = await books.run(lambda s: billing.refund(s, operation_id=op.id))
    assert refund.organization_id == org
    assert await books.run(org_usd) == (usd(5), 0)
    assert await books.balance(coach.id) == 0  # the member's own money is untouched
    assert (await books.reconcile()).ok
