"""Hypothesis stateful test: random sequences of top-ups, holds, settlements, releases,
inferences, refunds, coupon redemptions and replays against a plain-Python model of the
balances; after every step the database must agree with the model, every entry and the whole
ledger must sum to zero per currency, and no balance may be negative.

The database work runs on an event loop in a helper thread (Hypothesis drives the machine
synchronously), on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import defaultdict
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flplatform import billing
from flplatform.billing import ledger
from flplatform.billing.ledger import InsufficientFunds
from flplatform.billing.prices import set_price
from flplatform.db import create_engine, create_sessionmaker
from flplatform.errors import BadRequest
from flplatform.orm import GlobalModel, User
from flplatform.orm.billing import AccountKind, Currency, Hold
from tests.billing.conftest import usd

CENT = usd("0.01")
amounts = st.integers(min_value=1, max_value=500).map(lambda cents: cents * CENT)
INFERENCE_REQUEST = usd("0.30")
MARKET_PRICE = usd("0.20")  # per sample, on the owner's public model
FEE_BPS = 1000


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class LedgerMachine(RuleBasedStateMachine):
    url: str
    loop: Loop

    def __init__(self) -> None:
        super().__init__()
        self.engine = create_engine(self.url)
        self.maker = create_sessionmaker(self.engine)
        # model: (user index, "cash" | "coupon" | "held_cash" | "held_coupon") -> minor units
        self.model: dict[tuple[int, str], int] = defaultdict(int)
        self.holds: list[tuple[uuid.UUID, int, int, int]] = []  # (id, user, cash, coupon) open holds
        self.ops: list[tuple[uuid.UUID, dict[tuple[int, str], int]]] = []  # refundable ops and their effect
        self.refunded: set[uuid.UUID] = set()
        self.replayable: list[tuple[str, Any, dict[tuple[int, str], int]]] = []

    def db(self, fn: Any) -> Any:
        async def go() -> Any:
            async with self.maker() as session:
                result = await fn(session)
                await session.commit()
                return result

        return self.loop.run(go())

    def teardown(self) -> None:
        self.loop.run(self.engine.dispose())

    @initialize()
    def setup(self) -> None:
        async def make(s: Any) -> tuple[list[uuid.UUID], uuid.UUID]:
            users = [User(username=f"hyp-{uuid.uuid4().hex[:12]}") for _ in range(2)]
            s.add_all(users)
            await s.flush()
            model = GlobalModel(owner_id=users[0].id, name="public")
            s.add(model)
            await s.flush()
            await billing.set_model_pricing(s, model.id, public=True, price_per_sample=MARKET_PRICE)
            await set_price(s, "inference_request", INFERENCE_REQUEST, by=None)
            await set_price(s, "market_fee_bps", FEE_BPS, by=None)
            return [u.id for u in users], model.id

        self.users, self.model_id = self.db(make)

    # ------------------------------------------------------------------ helpers

    def _spend(self, user: int, cost: int, *, coupons: bool = True) -> dict[tuple[int, str], int] | None:
        coupon = min(self.model[(user, "coupon")], cost) if coupons else 0
        cash = cost - coupon
        if self.model[(user, "cash")] < cash:
            return None
        return {(user, "cash"): -cash, (user, "coupon"): -coupon}

    def _apply(self, effect: dict[tuple[int, str], int]) -> None:
        for k, v in effect.items():
            self.model[k] += v

    # ------------------------------------------------------------------ rules

    @rule(user=st.integers(0, 1), amount=amounts)
    def top_up(self, user: int, amount: int) -> None:
        key = f"topup:{uuid.uuid4()}"
        call = lambda s: billing.top_up(s, user_id=self.users[user], amount=amount, key=key)  # noqa: E731
        op = self.db(call)
        effect = {(user, "cash"): amount}
        self._apply(effect)
        self.ops.append((op.id, effect))
        self.replayable.append((key, call, effect))

    @rule(user=st.integers(0, 1), amount=amounts)
    def redeem_coupon(self, user: int, amount: int) -> None:
        code = f"H{uuid.uuid4().hex[:12]}"
        self.db(lambda s: billing.create_coupon(s, code=code, amount=amount))
        self.db(lambda s: billing.redeem_coupon(s, user_id=self.users[user], code=code))
        self.model[(user, "coupon")] += amount

    @rule(user=st.integers(0, 1), amount=amounts)
    def hold(self, user: int, amount: int) -> None:
        spend = self._spend(user, amount)
        try:
            hold = self.db(
                lambda s: billing.reserve(
                    s, owner_id=self.users[user], amount=amount, key=f"h:{uuid.uuid4()}"
                )
            )
        except InsufficientFunds:
            assert spend is None, "refused a hold the model could afford"
            return
        assert spend is not None, "granted a hold the model could not afford"
        cash, coupon = -spend[(user, "cash")], -spend[(user, "coupon")]
        assert (hold.amount, hold.coupon_amount) == (cash, coupon)
        self._apply(spend)
        self._apply({(user, "held_cash"): cash, (user, "held_coupon"): coupon})
        self.holds.append((hold.id, user, cash, coupon))

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), cost=st.integers(0, 600).map(lambda c: c * CENT))
    def settle(self, data: st.DataObject, cost: int) -> None:
        hold_id, user, cash, coupon = self.holds.pop(data.draw(st.integers(0, len(self.holds) - 1)))

        async def go(s: Any) -> Any:
            return await billing.settle(s, await s.get(Hold, hold_id), cost)

        op = self.db(go)
        billed = min(cost, cash + coupon)
        from_coupon = min(coupon, billed)
        from_cash = billed - from_coupon
        self._apply(
            {
                (user, "held_cash"): -cash,
                (user, "held_coupon"): -coupon,
                (user, "cash"): cash - from_cash,
                (user, "coupon"): coupon - from_coupon,
            }
        )
        assert op.amount == billed
        self.ops.append((op.id, {(user, "cash"): -from_cash, (user, "coupon"): -from_coupon}))
        # Settling again is a no-op returning the same operation.
        assert self.db(go).id == op.id

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold_id, user, cash, coupon = self.holds.pop(data.draw(st.integers(0, len(self.holds) - 1)))

        async def go(s: Any) -> bool:
            return await billing.release(s, await s.get(Hold, hold_id), reason="test")

        assert self.db(go) is True
        self._apply(
            {
                (user, "held_cash"): -cash,
                (user, "held_coupon"): -coupon,
                (user, "cash"): cash,
                (user, "coupon"): coupon,
            }
        )
        assert self.db(go) is False

    @rule(caller=st.integers(0, 1), samples=st.integers(1, 20))
    def infer(self, caller: int, samples: int) -> None:
        market = caller == 1  # user 1 uses user 0's public model; user 0 pays the price list
        cost = MARKET_PRICE * samples if market else INFERENCE_REQUEST
        spend = self._spend(caller, cost)
        key = f"inf:{uuid.uuid4()}"
        model = GlobalModel(id=self.model_id, owner_id=self.users[0], name="public")
        call = lambda s: billing.charge_inference(s, User(id=self.users[caller]), model, samples, key=key)  # noqa: E731
        try:
            op = self.db(call)
        except InsufficientFunds:
            assert spend is None, "refused an inference the model could afford"
            return
        assert spend is not None, "ran an inference the model could not afford"
        effect = dict(spend)
        if market:
            effect[(0, "cash")] = effect.get((0, "cash"), 0) + cost - cost * FEE_BPS // 10_000
        self._apply(effect)
        self.ops.append((op.id, effect))
        self.replayable.append((key, call, effect))

    @precondition(lambda self: self.ops)
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        op_id, effect = data.draw(st.sampled_from(self.ops))
        reverse = {k: -v for k, v in effect.items()}
        affordable = all(self.model[k] + v >= 0 for k, v in reverse.items())
        try:
            self.db(lambda s: billing.refund(s, operation_id=op_id))
        except InsufficientFunds:
            assert not affordable and op_id not in self.refunded
            return
        except BadRequest:  # an operation that moved nothing (a cost-0 settlement) has nothing to refund
            assert not any(effect.values())
            return
        if op_id not in self.refunded:
            assert affordable, "refund overdrew a balance"
            self._apply(reverse)
            self.refunded.add(op_id)

    @precondition(lambda self: self.replayable)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        _key, call, _effect = data.draw(st.sampled_from(self.replayable))
        self.db(call)  # same key: returns the first operation, moves nothing

    # ------------------------------------------------------------------ invariants

    @invariant()
    def balances_match_model(self) -> None:
        if not hasattr(self, "users"):
            return

        async def read(s: Any) -> dict[tuple[int, str], int]:
            out = {}
            for i, uid in enumerate(self.users):
                rows = await ledger.balances_of(s, uid)
                out[(i, "cash")] = rows.get((Currency.USD, AccountKind.AVAILABLE), 0)
                out[(i, "coupon")] = rows.get((Currency.COUPON, AccountKind.AVAILABLE), 0)
                out[(i, "held_cash")] = rows.get((Currency.USD, AccountKind.HELD), 0)
                out[(i, "held_coupon")] = rows.get((Currency.COUPON, AccountKind.HELD), 0)
            return out

        actual = self.db(read)
        assert all(v >= 0 for v in actual.values())
        assert actual == {k: self.model[k] for k in actual}

    @invariant()
    def ledger_reconciles(self) -> None:
        report = self.db(ledger.reconcile)
        assert report.ok, report


def test_ledger_state_machine(db_url: str) -> None:
    loop = Loop()
    LedgerMachine.url, LedgerMachine.loop = db_url, loop
    try:
        machine = LedgerMachine.TestCase
        machine.settings = settings(
            # Bounded: ~30 sequences over both databases keeps the folder fast.
            max_examples=20 if db_url.startswith("sqlite") else 10,
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        machine().runTest()
    finally:
        loop.close()
