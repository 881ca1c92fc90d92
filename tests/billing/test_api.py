"""The billing router over HTTP: permissions, idempotency, webhook signatures, reports."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from flplatform.auth.credentials import sign
from tests.billing.conftest import usd


async def test_admin_top_up_with_idempotency_key(client, admin, alice, books):
    body = {"user_id": alice.id, "amount": "12.5"}
    headers = {**admin.headers, "Idempotency-Key": "topup-1"}
    first = await client.post("/api/billing/top-ups/", json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["amount"] == "12.50000000" and first.json()["kind"] == "top_up"
    replay = await client.post("/api/billing/top-ups/", json=body, headers=headers)
    assert replay.status_code == 201 and replay.json() == first.json()
    assert replay.headers["Idempotent-Replayed"] == "true"
    other = await client.post("/api/billing/top-ups/", json={**body, "amount": "13"}, headers=headers)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_mismatch"
    balance = (await client.get("/api/billing/balance/", headers=alice.headers)).json()
    assert {"currency": "USD", "available": "12.50000000", "held": "0.00000000"} in balance["balances"]
    forbidden = await client.post("/api/billing/top-ups/", json=body, headers=alice.headers)
    assert forbidden.status_code == 403
    detail = (
        await client.get(f"/api/billing/operations/{first.json()['id']}/", headers=alice.headers)
    ).json()
    assert {p["account"]: p["amount"] for p in detail["postings"]} == {
        f"user:{alice.id}:available:USD": "12.50000000",
        "system:external_payments:USD": "-12.50000000",
    }


async def test_amounts_are_exact_decimals(client, admin, alice):
    for bad in ("0", "-1", "0.000000001", "abc"):
        r = await client.post(
            "/api/billing/top-ups/", json={"user_id": alice.id, "amount": bad}, headers=admin.headers
        )
        assert r.status_code == 422, bad
    r = await client.post(
        "/api/billing/top-ups/", json={"user_id": alice.id, "amount": "0.00000001"}, headers=admin.headers
    )
    assert r.status_code == 201 and r.json()["amount"] == "0.00000001"
    missing = await client.post(
        "/api/billing/top-ups/", json={"user_id": str(uuid.uuid4()), "amount": "1"}, headers=admin.headers
    )
    assert missing.status_code == 404


async def test_payment_webhook_signature_and_external_id(client, alice, books):
    event = json.dumps({"external_id": "pi_1", "user_id": alice.id, "amount": "5"}).encode()
    unsigned = await client.post("/api/billing/webhooks/payments/", content=event)
    assert unsigned.status_code == 401
    forged = await client.post(
        "/api/billing/webhooks/payments/", content=event, headers={"X-Signature": "0" * 64}
    )
    assert forged.status_code == 401
    signed = {"X-Signature": sign(event), "Content-Type": "application/json"}
    first = await client.post("/api/billing/webhooks/payments/", content=event, headers=signed)
    again = await client.post("/api/billing/webhooks/payments/", content=event, headers=signed)
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    assert await books.balance(alice.user.id) == usd(5)
    changed = json.dumps({"external_id": "pi_1", "user_id": alice.id, "amount": "6"}).encode()
    conflict = await client.post(
        "/api/billing/webhooks/payments/", content=changed, headers={"X-Signature": sign(changed)}
    )
    assert conflict.status_code == 409


async def test_conversion_402_changes_nothing(client, alice, books):
    r = await client.post(
        "/api/billing/conversions/",
        json={"usd_amount": "1"},
        headers={**alice.headers, "Idempotency-Key": "c1"},
    )
    assert r.status_code == 402 and r.json()["code"] == "insufficient_funds"
    await books.top_up(alice.user.id, usd(1))
    # The failed attempt stored nothing: the same key now runs.
    ok = await client.post(
        "/api/billing/conversions/",
        json={"usd_amount": "1"},
        headers={**alice.headers, "Idempotency-Key": "c1"},
    )
    assert ok.status_code == 201
    tokens = (await client.get("/api/billing/balance/", headers=alice.headers)).json()["balances"]
    assert {"currency": "TOKEN", "available": "100.00000000", "held": "0.00000000"} in tokens


async def test_coupons_over_http(client, admin, alice):
    r = await client.post(
        "/api/billing/coupons/", json={"code": "WELCOME", "amount": "2"}, headers=admin.headers
    )
    assert r.status_code == 201
    assert (
        await client.post(
            "/api/billing/coupons/", json={"code": "WELCOME", "amount": "2"}, headers=admin.headers
        )
    ).status_code == 409
    assert (
        await client.post("/api/billing/coupons/", json={"code": "X1", "amount": "2"}, headers=alice.headers)
    ).status_code == 403
    redeemed = await client.post(
        "/api/billing/coupons/redeem/", json={"code": "WELCOME"}, headers=alice.headers
    )
    assert redeemed.status_code == 200 and redeemed.json()["kind"] == "coupon_redemption"
    assert (
        await client.post("/api/billing/coupons/redeem/", json={"code": "NOPE"}, headers=alice.headers)
    ).status_code == 404
    expired = dt.datetime(2020, 1, 1, tzinfo=dt.UTC).isoformat()
    await client.post(
        "/api/billing/coupons/",
        json={"code": "OLD", "amount": "1", "expires_at": expired},
        headers=admin.headers,
    )
    assert (
        await client.post("/api/billing/coupons/redeem/", json={"code": "OLD"}, headers=alice.headers)
    ).status_code == 409


async def test_history_filters_pagination_and_privacy(client, admin, alice, bob, books):
    for _ in range(3):
        await books.top_up(alice.user.id, usd(1))
    await books.top_up(bob.user.id, usd(1))
    page = await client.get("/api/billing/operations/?limit=2&offset=0", headers=alice.headers)
    assert page.status_code == 200 and len(page.json()) == 2 and page.headers["X-Total-Count"] == "3"
    assert (await client.get("/api/billing/operations/?kind=training", headers=alice.headers)).json() == []
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    assert (
        await client.get("/api/billing/operations/", params={"since": future}, headers=alice.headers)
    ).json() == []
    assert (
        await client.get(f"/api/billing/operations/?user_id={bob.id}", headers=alice.headers)
    ).status_code == 403
    assert (
        await client.get(f"/api/billing/balance/?user_id={bob.id}", headers=alice.headers)
    ).status_code == 403
    everyone = await client.get("/api/billing/operations/?all=true", headers=admin.headers)
    assert everyone.headers["X-Total-Count"] == "4"
    bobs_op = (await client.get(f"/api/billing/operations/?user_id={bob.id}", headers=admin.headers)).json()[
        0
    ]
    assert (
        await client.get(f"/api/billing/operations/{bobs_op['id']}/", headers=alice.headers)
    ).status_code == 404


async def test_market_pricing_report_and_refund(client, admin, alice, bob, books):
    model = await books.model(alice.user.id)
    url = f"/api/billing/models/{model.id}/pricing/"
    assert (
        await client.put(
            url, json={"inference_public": True, "inference_price_per_sample": "0.5"}, headers=bob.headers
        )
    ).status_code == 404
    r = await client.put(
        url, json={"inference_public": True, "inference_price_per_sample": "0.5"}, headers=alice.headers
    )
    assert r.status_code == 200 and r.json()["inference_price_per_sample"] == "0.50000000"
    await books.top_up(bob.user.id, usd(10))
    from flplatform import billing

    op = await books.run(lambda s: billing.charge_inference(s, bob.user, model, 4, key="x"))
    report = (await client.get(f"/api/billing/models/{model.id}/report/", headers=alice.headers)).json()
    assert report["inference_cost"] == "2.00000000" and report["api_income"] == "1.80000000"
    assert (
        await client.get(f"/api/billing/models/{model.id}/report/", headers=bob.headers)
    ).status_code == 404
    refund = await client.post(
        f"/api/billing/operations/{op.id}/refund/", json={"reason": "test"}, headers=admin.headers
    )
    assert refund.status_code == 201 and refund.json()["refunds_operation_id"] == str(op.id)
    assert await books.balance(bob.user.id) == usd(10)


async def test_statement_and_bills(client, admin, alice, books):
    await books.top_up(alice.user.id, usd(5))
    period = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    bill = await client.post(
        "/api/billing/bills/",
        json={"user_id": alice.id, "amount": "3", "period": period},
        headers=admin.headers,
    )
    assert bill.status_code == 201 and bill.json()["status"] == "open"
    paid = await client.post(f"/api/billing/bills/{bill.json()['id']}/pay/", headers=alice.headers)
    assert paid.status_code == 200 and paid.json()["status"] == "paid"
    statement = (await client.get(f"/api/billing/statements/{period}/", headers=alice.headers)).json()
    usd_line = next(c for c in statement["currencies"] if c["currency"] == "USD")
    assert usd_line == {
        "currency": "USD",
        "opening": "0.00000000",
        "closing": "2.00000000",
        "money_in": "5.00000000",
        "money_out": "3.00000000",
    }
    assert {o["kind"] for o in statement["operations"]} == {"top_up", "pay_bill"}
    assert statement["bills"][0]["status"] == "paid"
    assert (await client.get("/api/billing/statements/2026-13/", headers=alice.headers)).status_code in (
        400,
        422,
    )
    big = await client.post(
        "/api/billing/bills/", json={"user_id": alice.id, "amount": "30"}, headers=admin.headers
    )
    refused = await client.post(f"/api/billing/bills/{big.json()['id']}/pay/", headers=alice.headers)
    assert refused.status_code == 402
    bills = (await client.get("/api/billing/bills/", headers=alice.headers)).json()
    assert sorted(b["status"] for b in bills) == ["open", "paid"]


async def test_price_list_reconciliation_and_audit(client, admin, alice, books):
    prices = {p["item"]: p for p in (await client.get("/api/billing/prices/", headers=alice.headers)).json()}
    assert (
        prices["training_update"]["amount"] == "0.00000000" and prices["market_fee_bps"]["amount"] == "1000"
    )
    assert (
        await client.put(
            "/api/billing/prices/training_update/", json={"amount": "1.5"}, headers=alice.headers
        )
    ).status_code == 403
    r = await client.put(
        "/api/billing/prices/training_update/", json={"amount": "1.5"}, headers=admin.headers
    )
    assert r.status_code == 200 and r.json()["amount"] == "1.50000000"
    assert (
        await client.put("/api/billing/prices/nope/", json={"amount": "1"}, headers=admin.headers)
    ).status_code == 404
    assert (
        await client.put("/api/billing/prices/market_fee_bps/", json={"amount": "1.5"}, headers=admin.headers)
    ).status_code == 422
    await books.top_up(alice.user.id, usd(1))
    recon = await client.get("/api/billing/reconciliation/", headers=admin.headers)
    assert recon.status_code == 200 and recon.json()["ok"] is True
    assert (await client.get("/api/billing/reconciliation/", headers=alice.headers)).status_code == 403
    audit = await client.get("/api/audit-log/?action=billing.", headers=admin.headers)
    actions = {a["action"] for a in audit.json()}
    assert {"billing.price_set", "billing.top_up"} <= actions
    row = audit.json()[0]
    assert row["host"] and row["module"] and row["function"] and row["level"] == "INFO"
    assert (await client.get("/api/audit-log/", headers=alice.headers)).status_code == 403
