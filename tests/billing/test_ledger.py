"""One example per ledger operation, asserting every leg and the reconciliation."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from flplatform import billing
from flplatform.billing.ledger import InsufficientFunds, Leg, post_entry, system_account, user_account
from flplatform.orm.billing import AccountKind, Currency, OperationKind
from tests.billing.conftest import usd


def acct(user, kind="available", currency="USD"):
    return f"user:{user.id}:{kind}:{currency}"


async def test_top_up_credits_user_from_external_payments(books, alice):
    op = await books.top_up(alice.user.id, usd(10))
    assert op.kind == OperationKind.TOP_UP and op.amount == usd(10)
    assert await books.postings(op.entry_id) == {
        acct(alice.user): usd(10),
        "system:external_payments:USD": -usd(10),
    }
    assert await books.balance(alice.user.id) == usd(10)
    assert (await books.reconcile()).ok


async def test_charge_spends_coupons_before_usd(books, alice):
    await books.top_up(alice.user.id, usd(10))
    await books.coupon(alice.user.id, usd(3))
    op = await books.run(
        lambda s: billing.charge(
            s, payer_id=alice.user.id, amount=usd(5), kind=OperationKind.MODEL_COPY, key="k1"
        )
    )
    assert await books.postings(op.entry_id) == {
        acct(alice.user): -usd(2),
        acct(alice.user, currency="COUPON"): -usd(3),
        "system:promotions:COUPON": usd(3),
        "system:promotions:USD": -usd(3),
        "system:revenue:USD": usd(5),
    }
    assert await books.balance(alice.user.id) == usd(8)
    assert await books.balance(alice.user.id, Currency.COUPON) == 0
    assert (await books.reconcile()).ok


async def test_insufficient_funds_writes_nothing(books, alice):
    await books.top_up(alice.user.id, usd(1))
    with pytest.raises(InsufficientFunds) as caught:
        await books.run(
            lambda s: billing.charge(
                s, payer_id=alice.user.id, amount=usd(2), kind=OperationKind.MODEL_COPY, key="k"
            )
        )
    assert caught.value.status_code == 402
    assert await books.balance(alice.user.id) == usd(1)
    ops, total = await books.run(lambda s: billing.list_operations(s, user_id=alice.user.id))
    assert total == 1


async def test_same_key_charges_once_and_other_intent_conflicts(books, alice):
    await books.top_up(alice.user.id, usd(10))
    charge = lambda amount: books.run(  # noqa: E731
        lambda s: billing.charge(
            s, payer_id=alice.user.id, amount=amount, kind=OperationKind.MODEL_COPY, key="same"
        )
    )
    first = await charge(usd(4))
    again = await charge(usd(4))
    assert first.id == again.id
    assert await books.balance(alice.user.id) == usd(6)
    from flplatform.errors import Conflict

    with pytest.raises(Conflict):
        await charge(usd(5))


async def test_unbalanced_entry_is_refused(books, alice):
    async def bad(s):
        a = await user_account(s, alice.user.id, Currency.USD)
        r = await system_account(s, AccountKind.REVENUE, Currency.USD)
        await post_entry(s, key="bad", kind="x", legs=[Leg(a, -1), Leg(r, 2)], intent={})

    with pytest.raises(ValueError, match="balance"):
        await books.run(bad)


async def test_hold_settle_charges_cost_and_releases_rest(books, alice):
    await books.top_up(alice.user.id, usd(10))
    await books.coupon(alice.user.id, usd(1))
    hold = await books.run(lambda s: billing.reserve(s, owner_id=alice.user.id, amount=usd(4), key="h"))
    assert (hold.amount, hold.coupon_amount) == (usd(3), usd(1))
    assert await books.postings(hold.entry_id) == {
        acct(alice.user): -usd(3),
        acct(alice.user, "held"): usd(3),
        acct(alice.user, currency="COUPON"): -usd(1),
        acct(alice.user, "held", "COUPON"): usd(1),
    }
    assert await books.balance(alice.user.id) == usd(7)
    assert await books.balance(alice.user.id, held=True) == usd(3)
    assert (await books.reconcile()).ok

    async def settle(s):
        from flplatform.orm.billing import Hold

        return await billing.settle(s, await s.get(Hold, hold.id), usd("2.5"))

    op = await books.run(settle)
    assert op.amount == usd("2.5")
    assert await books.postings(op.entry_id) == {
        acct(alice.user): usd("1.5"),  # 3 held back minus the 1.5 of cash spent
        acct(alice.user, "held"): -usd(3),
        acct(alice.user, "held", "COUPON"): -usd(1),
        "system:promotions:COUPON": usd(1),
        "system:promotions:USD": -usd(1),
        "system:revenue:USD": usd("2.5"),
    }
    assert await books.balance(alice.user.id) == usd("8.5")
    assert await books.balance(alice.user.id, held=True) == 0
    again = await books.run(settle)
    assert again.id == op.id and await books.balance(alice.user.id) == usd("8.5")
    assert (await books.reconcile()).ok


async def test_release_returns_everything_once(books, alice):
    await books.top_up(alice.user.id, usd(5))
    hold = await books.run(lambda s: billing.reserve(s, owner_id=alice.user.id, amount=usd(5), key="h2"))
    assert await books.balance(alice.user.id) == 0

    async def release(s):
        from flplatform.orm.billing import Hold

        return await billing.release(s, await s.get(Hold, hold.id), reason="cancelled")

    assert await books.run(release) is True
    assert await books.run(release) is False
    assert await books.balance(alice.user.id) == usd(5)
    assert await books.balance(alice.user.id, held=True) == 0
    assert (await books.reconcile()).ok


async def test_reserve_without_funds_is_402(books, alice):
    await books.top_up(alice.user.id, usd(1))
    with pytest.raises(InsufficientFunds):
        await books.run(lambda s: billing.reserve(s, owner_id=alice.user.id, amount=usd(2), key="h3"))
    assert await books.balance(alice.user.id) == usd(1)
    assert await books.balance(alice.user.id, held=True) == 0


async def test_training_round_reserve_settle_release(books, alice, bob):
    await books.price("training_update", usd(1))
    await books.price("training_sample_epoch", usd("0.001"))
    await books.top_up(alice.user.id, usd(100))
    model = await books.model(alice.user.id)
    training = SimpleNamespace(
        id=uuid.uuid4(),
        actor_id=alice.user.id,
        model_id=model.id,
        options={"epochs": 2, "billing_samples_per_update": 1000},
    )
    hold = await books.run(lambda s: billing.reserve_round(s, training, 1, [alice.user, bob.user]))
    assert hold.amount == 2 * (usd(1) + usd("0.001") * 1000 * 2)  # 2 × 3 USD
    again = await books.run(lambda s: billing.reserve_round(s, training, 1, [alice.user, bob.user]))
    assert again.id == hold.id and await books.balance(alice.user.id) == usd(94)
    op = await books.run(
        lambda s: billing.settle_round(s, training, 1, [(alice.user.id, 500), (bob.user.id, 700)])
    )
    assert op.kind == OperationKind.TRAINING and op.amount == 2 * usd(1) + usd("0.001") * 1200 * 2
    assert op.count_of_lines == 1200 and op.count_of_training_epoch == 2 and op.model_id == model.id
    assert await books.balance(alice.user.id) == usd(100) - op.amount
    assert (await books.run(lambda s: billing.settle_round(s, training, 1, []))).id == op.id
    # Round 2 fails: everything comes back.
    await books.run(lambda s: billing.reserve_round(s, training, 2, [bob.user]))
    assert await books.run(lambda s: billing.release_round(s, training, 2, "aggregation failed")) is True
    assert await books.balance(alice.user.id) == usd(100) - op.amount
    report = await books.run(lambda s: billing.model_report(s, model.id))
    assert report["training_cost"] == op.amount and report["training_operations"] == 1
    assert (await books.reconcile()).ok


async def test_free_round_reserves_nothing(books, alice):
    training = SimpleNamespace(id=uuid.uuid4(), actor_id=alice.user.id, model_id=None, options={})
    assert await books.run(lambda s: billing.reserve_round(s, training, 1, [alice.user])) is None
    assert await books.run(lambda s: billing.settle_round(s, training, 1, [(alice.user.id, 5)])) is None


async def test_market_inference_pays_owner_minus_fee_in_one_entry(books, alice, bob):
    model = await books.model(alice.user.id)
    await books.run(
        lambda s: billing.set_model_pricing(s, model.id, public=True, price_per_sample=usd("0.1"))
    )
    await books.top_up(bob.user.id, usd(10))
    op = await books.run(lambda s: billing.charge_inference(s, bob.user, model, 20, key="inf-1"))
    assert op.kind == OperationKind.INFERENCE_API and op.amount == usd(2) and op.owner_income == usd("1.8")
    assert await books.postings(op.entry_id) == {
        acct(bob.user): -usd(2),
        acct(alice.user): usd("1.8"),
        "system:revenue:USD": usd("0.2"),
    }
    report = await books.run(lambda s: billing.model_report(s, model.id))
    assert (
        report["api_income"] == usd("1.8")
        and report["inference_cost"] == usd(2)
        and report["samples_inferred"] == 20
    )
    assert (await books.reconcile()).ok


async def test_own_model_inference_uses_price_list(books, alice):
    model = await books.model(alice.user.id)
    assert (
        await books.run(lambda s: billing.charge_inference(s, alice.user, model, 5)) is None
    )  # free by default
    await books.price("inference_request", usd("0.5"))
    await books.price("inference_sample", usd("0.01"))
    with pytest.raises(InsufficientFunds):
        await books.run(lambda s: billing.charge_inference(s, alice.user, model, 5))
    await books.top_up(alice.user.id, usd(1))
    op = await books.run(lambda s: billing.charge_inference(s, alice.user, model, 5))
    assert op.kind == OperationKind.INFERENCE
    assert await books.postings(op.entry_id) == {
        acct(alice.user): -usd("0.55"),
        "system:revenue:USD": usd("0.55"),
    }


async def test_refund_reverses_market_inference_and_leaves_original(books, alice, bob):
    model = await books.model(alice.user.id)
    await books.run(lambda s: billing.set_model_pricing(s, model.id, public=True, price_per_sample=usd(1)))
    await books.top_up(bob.user.id, usd(5))
    await books.coupon(bob.user.id, usd(1))
    op = await books.run(lambda s: billing.charge_inference(s, bob.user, model, 3, key="inf-2"))
    original = await books.postings(op.entry_id)
    refund = await books.run(lambda s: billing.refund(s, operation_id=op.id, reason="bad output"))
    assert refund.refunds_operation_id == op.id
    assert await books.postings(refund.entry_id) == {k: -v for k, v in original.items()}
    assert await books.postings(op.entry_id) == original
    assert await books.balance(bob.user.id) == usd(5) and await books.balance(
        bob.user.id, Currency.COUPON
    ) == usd(1)
    assert await books.balance(alice.user.id) == 0
    again = await books.run(lambda s: billing.refund(s, operation_id=op.id))
    assert again.id == refund.id
    report = await books.run(lambda s: billing.model_report(s, model.id))
    assert report["inference_cost"] == 0 and report["api_income"] == 0
    assert (await books.reconcile()).ok


async def test_conversion_balances_per_currency(books, alice):
    await books.price("token_per_usd", 50)
    await books.top_up(alice.user.id, usd(2))
    op = await books.run(
        lambda s: billing.convert_to_tokens(s, user_id=alice.user.id, usd_amount=usd(2), key="cv")
    )
    assert await books.postings(op.entry_id) == {
        acct(alice.user): -usd(2),
        "system:exchange:USD": usd(2),
        acct(alice.user, currency="TOKEN"): usd(100),
        "system:exchange:TOKEN": -usd(100),
    }
    await books.price("model_copy", usd(30))  # tokens
    model = await books.model(alice.user.id)
    (copy,) = await books.run(lambda s: billing.charge_model_copy(s, alice.user, model, key="copy-1"))
    assert copy.currency == Currency.TOKEN and await books.balance(alice.user.id, Currency.TOKEN) == usd(70)
    assert await books.total_by_currency() == {"USD": 0, "TOKEN": 0}


async def test_bill_is_paid_once(books, alice):
    await books.top_up(alice.user.id, usd(3))
    await books.coupon(alice.user.id, usd(5))  # coupons never pay bills
    bill = await books.run(lambda s: billing.create_bill(s, user_id=alice.user.id, amount=usd(2)))

    async def pay(s):
        from flplatform.orm.billing import Bill

        return await billing.pay_bill(s, await s.get(Bill, bill.id))

    op = await books.run(pay)
    assert await books.postings(op.entry_id) == {acct(alice.user): -usd(2), "system:revenue:USD": usd(2)}
    assert (await books.run(pay)).id == op.id
    assert await books.balance(alice.user.id) == usd(1)


async def test_payout_moves_earnings_out(books, alice):
    await books.top_up(alice.user.id, usd(3))
    op = await books.run(lambda s: billing.payout(s, user_id=alice.user.id, amount=usd(3), key="p"))
    assert await books.postings(op.entry_id) == {
        acct(alice.user): -usd(3),
        "system:market_payouts:USD": usd(3),
    }
    with pytest.raises(InsufficientFunds):
        await books.run(lambda s: billing.payout(s, user_id=alice.user.id, amount=1, key="p2"))


async def test_coupon_redeemed_once_per_user_and_bounded(books, alice, bob, make_user):
    await books.run(lambda s: billing.create_coupon(s, code="TWO", amount=usd(1), max_redemptions=2))
    first = await books.run(lambda s: billing.redeem_coupon(s, user_id=alice.user.id, code="TWO"))
    assert await books.postings(first.entry_id) == {
        acct(alice.user, currency="COUPON"): usd(1),
        "system:promotions:COUPON": -usd(1),
    }
    assert (
        await books.run(lambda s: billing.redeem_coupon(s, user_id=alice.user.id, code="TWO"))
    ).id == first.id
    await books.run(lambda s: billing.redeem_coupon(s, user_id=bob.user.id, code="TWO"))
    carol = await make_user("carol")
    from flplatform.errors import Conflict

    with pytest.raises(Conflict):
        await books.run(lambda s: billing.redeem_coupon(s, user_id=carol.user.id, code="TWO"))
    assert await books.balance(alice.user.id, Currency.COUPON) == usd(1)
