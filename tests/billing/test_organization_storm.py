"""Members of one organisation spending its money at once (PostgreSQL: independent sessions,
real commits, row locks): the balance never goes negative, no member passes their limit, and the
ledger reconciles."""

from __future__ import annotations

import asyncio

import pytest

from flplatform import billing
from flplatform.billing import limits
from flplatform.errors import PaymentRequired
from flplatform.orm.billing import Currency, OperationKind
from tests.billing.conftest import usd
from tests.permissions.conftest import build_org_tree

pytestmark = pytest.mark.postgres_only


async def _attempt(books, factory) -> str:
    try:
        await books.run(factory)
        return "ok"
    except PaymentRequired as exc:
        return exc.code


async def test_members_storm_the_organisation_within_limits_and_balance(app, books) -> None:
    tree = await build_org_tree(app, "storm", projects=0, groups=0, second=False)
    org = tree.org.id
    m1, m2, m3 = (tree.actors[n].user.id for n in ("member_one", "member_all", "orphan"))
    await books.run(lambda s: billing.top_up(s, organization_id=org, amount=usd(9), key="fund"))
    await books.run(lambda s: limits.set_limit(s, org, m1, Currency.USD, usd(3), by=None))
    await books.run(lambda s: limits.set_limit(s, org, m2, Currency.USD, usd(4), by=None))
    # m3 has no limit: only the balance stops them.
    tasks = []
    for i in range(8):
        tasks.append(
            _attempt(
                books,
                lambda s, i=i: billing.charge(
                    s,
                    payer_id=m1,
                    organization_id=org,
                    amount=usd(1),
                    kind=OperationKind.INFERENCE,
                    key=f"m1:{i}",
                ),
            )
        )
        tasks.append(
            _attempt(
                books,
                lambda s, i=i: billing.reserve(
                    s, owner_id=m2, organization_id=org, amount=usd(1), key=f"m2:{i}", training_id=None
                ),
            )
        )
        tasks.append(
            _attempt(
                books,
                lambda s, i=i: billing.charge(
                    s,
                    payer_id=m3,
                    organization_id=org,
                    amount=usd(1),
                    kind=OperationKind.INFERENCE,
                    key=f"m3:{i}",
                ),
            )
        )
    results = await asyncio.gather(*tasks)
    m1_ok, m2_ok, m3_ok = (sum(r == "ok" for r in results[k::3]) for k in range(3))
    assert m1_ok <= 3 and m2_ok <= 4
    assert m1_ok + m2_ok + m3_ok == 9  # demand (24) exceeds the 9 USD: every dollar is spent, once
    assert set(results) <= {"ok", "insufficient_funds", "spending_limit_exceeded"}

    async def read(s):
        return await billing.balances(s, org, organization=True)

    lines = {line["currency"]: line for line in await books.run(read)}
    assert lines[Currency.USD]["available"] == 0 and lines[Currency.USD]["held"] == usd(m2_ok)
    for member, ok in ((m1, m1_ok), (m2, m2_ok)):
        spent = await books.run(lambda s, member=member: limits.member_spent(s, org, member, Currency.USD))
        assert spent == usd(ok)
    assert (await books.reconcile()).ok
