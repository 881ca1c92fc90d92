"""Automatic monthly bills and the overdue rule (docs/billing.md, "Monthly bills").

The month-end job issues one bill per organisation and period, with the statement's invoice lines;
running it again issues nothing. An open bill past its due date stops new paid work (inference,
training holds) with 402 ``bill_overdue`` until it is paid."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from types import SimpleNamespace

from flplatform import billing, workqueue
from flplatform.billing.jobs import run_monthly_bills_job
from flplatform.billing.monthly import MONTHLY_BILLS_JOB, queue_monthly_bills
from flplatform.orm.base import utcnow
from tests.billing.conftest import usd
from tests.billing.test_organization_money import infer
from tests.inference.conftest import DropoutMLP, add_model  # noqa: F401  (fixture)
from tests.permissions.conftest import build_org_tree


def this_period() -> str:
    now = utcnow()
    return f"{now.year:04d}-{now.month:02d}"


async def test_month_end_job_issues_one_bill_per_organisation(app, client, books, add_model) -> None:  # noqa: F811
    tree = await build_org_tree(app, "monthly", projects=0, groups=0)
    admin, m1, m2, other = tree.org_admin, tree.member_one, tree.member_all, tree.other_admin
    await books.run(
        lambda s: billing.top_up(s, organization_id=tree.org.id, amount=usd(5), key="fund-monthly")
    )
    await books.price("inference_request", usd("0.5"))
    model1 = await add_model(m1, DropoutMLP(), input_shape=[None, 4])
    model2 = await add_model(m2, DropoutMLP(), input_shape=[None, 4])
    for member, model in ((m1, model1), (m1, model1), (m2, model2)):
        assert (await infer(client, member, model)).status_code == 200

    # Month end: the sweep queues the month that ended (here: this month, seen from the next one);
    # the server's in-process worker runs it. Queued again (another server, a restart): same job.
    period = this_period()
    start = utcnow().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    next_month = (start + dt.timedelta(days=32)).replace(day=1)
    assert await books.run(lambda s: queue_monthly_bills(s, next_month)) == period
    key = f"{MONTHLY_BILLS_JOB}:{period}"
    job = await books.run(
        lambda s: workqueue.enqueue(s, MONTHLY_BILLS_JOB, {"period": period}, dedupe_key=key)
    )
    for _ in range(200):
        row = await books.run(lambda s: workqueue.get_job(s, job.id))
        if row.status.value in ("finished", "error"):
            break
        await asyncio.sleep(0.05)
    assert row.status.value == "finished" and row.result["bills"] >= 1, (row.status, row.result, row.error)
    # Running it again (a retried job, a second worker) issues nothing new.
    ctx = workqueue.JobContext(
        sessionmaker=app.state.sessionmaker, settings=app.state.settings, job_id=uuid.uuid4(), attempt=2
    )
    again = await run_monthly_bills_job(ctx, {"period": period})
    assert again["bills"] == row.result["bills"]

    base = f"/api/organizations/{tree.org.id}/billing"
    bills = await client.get(f"{base}/bills/", headers=admin.headers)
    assert bills.status_code == 200 and bills.headers["x-total-count"] == "1", bills.text
    bill = bills.json()[0]
    assert bill["monthly"] is True and bill["period"] == period and bill["status"] == "settled"
    assert bill["amount"] == "1.50000000" and bill["operation_id"] is None
    lines = {(line["user_id"], line["kind"], line["count"], line["amount"]) for line in bill["lines"]}
    assert lines == {(m1.id, "inference", 2, "1.00000000"), (m2.id, "inference", 1, "0.50000000")}
    # The statement of the month lists it; usage is prepaid, so nothing more left the balance.
    statement = (await client.get(f"{base}/statements/{period}/", headers=admin.headers)).json()
    assert [b["id"] for b in statement["bills"]] == [bill["id"]]
    balance = (await client.get(f"{base}/balance/", headers=admin.headers)).json()["balances"]
    assert {"currency": "USD", "available": "3.50000000", "held": "0.00000000"} in balance
    # Another organisation sees none of it; a settled bill cannot be paid.
    assert (await client.get(f"{base}/bills/", headers=other.headers)).status_code == 404
    paid = await client.post(f"{base}/bills/{bill['id']}/pay/", headers=admin.headers)
    assert (
        paid.status_code == 200 and paid.json()["status"] == "settled" and paid.json()["operation_id"] is None
    )
    assert (await books.reconcile()).ok


async def test_overdue_bill_stops_paid_work_until_paid(app, client, books, add_model) -> None:  # noqa: F811
    tree = await build_org_tree(app, "overdue", projects=0, groups=0, second=False)
    admin, member, root = tree.org_admin, tree.member_one, tree.superuser
    base = f"/api/organizations/{tree.org.id}/billing"
    await books.run(
        lambda s: billing.top_up(s, organization_id=tree.org.id, amount=usd(5), key="fund-overdue")
    )
    await books.price("inference_request", usd("0.1"))
    await books.price("training_update", usd("0.1"))
    model = await add_model(member, DropoutMLP(), input_shape=[None, 4])

    # A bill due in FLP_BILL_DUE_DAYS stops nothing yet.
    r = await client.post(
        "/api/billing/bills/", json={"organization_id": str(tree.org.id), "amount": "1"}, headers=root.headers
    )
    assert r.status_code == 201 and r.json()["due_at"] is not None, r.text
    due = dt.datetime.fromisoformat(r.json()["due_at"])
    assert due - utcnow() > dt.timedelta(days=app.state.settings.bill_due_days - 1)
    assert (await infer(client, member, model)).status_code == 200

    # One past its due date does: inference and a training round's hold are refused with 402.
    past = (utcnow() - dt.timedelta(days=1)).isoformat()
    r = await client.post(
        "/api/billing/bills/",
        json={"organization_id": str(tree.org.id), "amount": "2", "due_at": past},
        headers=root.headers,
    )
    assert r.status_code == 201, r.text
    overdue = r.json()
    refused = await infer(client, member, model)
    assert refused.status_code == 402 and refused.json()["code"] == "bill_overdue", refused.text
    assert (
        overdue["id"] in refused.json()["detail"]
        and "until an organisation admin pays it" in refused.json()["detail"]
    )
    training = SimpleNamespace(id=uuid.uuid4(), actor_id=member.user.id, options={}, model_id=None)
    try:
        await books.run(lambda s: billing.reserve_round(s, training, 1, ["p1"]))
    except billing.BillOverdue as exc:
        assert exc.code == "bill_overdue"
    else:
        raise AssertionError("a training round started with an overdue bill")
    # Free actions go on: the admin reads the books and pays the bill.
    assert (await client.get(f"{base}/balance/", headers=admin.headers)).status_code == 200
    paid = await client.post(f"{base}/bills/{overdue['id']}/pay/", headers=admin.headers)
    assert paid.status_code == 200 and paid.json()["status"] == "paid", paid.text
    assert (await infer(client, member, model)).status_code == 200
    hold = await books.run(lambda s: billing.reserve_round(s, training, 1, ["p1"]))
    assert hold.organization_id == tree.org.id
    assert (await books.reconcile()).ok


async def test_overdue_personal_bill_stops_a_users_paid_work(app, client, books, alice, add_model) -> None:  # noqa: F811
    await books.top_up(alice.user.id, usd(3))
    await books.price("inference_request", usd("0.1"))
    model = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    async with app.state.sessionmaker() as s:
        bill = await billing.create_bill(
            s, user_id=alice.user.id, amount=usd(1), due_at=utcnow() - dt.timedelta(seconds=1)
        )
        await s.commit()
    refused = await infer(client, alice, model)
    assert refused.status_code == 402 and refused.json()["code"] == "bill_overdue", refused.text
    assert "POST /api/billing/bills/" in refused.json()["detail"]
    paid = await client.post(f"/api/billing/bills/{bill.id}/pay/", headers=alice.headers)
    assert paid.status_code == 200 and paid.json()["status"] == "paid", paid.text
    assert (await infer(client, alice, model)).status_code == 200
