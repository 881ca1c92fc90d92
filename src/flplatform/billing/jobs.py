"""The billing domain's work-queue job: ``billing.monthly_bills`` (one period's monthly bills of
every organisation, :mod:`flplatform.billing.monthly`). :func:`register` adds it to the work
queue; ``flplatform.jobs.install()`` calls it in every entry point — nothing registers at import
time."""

from __future__ import annotations

from typing import Any

from flplatform import workqueue
from flplatform.billing.monthly import MONTHLY_BILLS_JOB, issue_monthly_bills
from flplatform.orm.workqueue import WorkKind


async def run_monthly_bills_job(ctx: workqueue.JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Handler of ``billing.monthly_bills`` (payload ``{"period": "YYYY-MM"}``): idempotent, a
    re-run finds the bills it issued (unique per organisation and period)."""
    period = str(payload["period"])
    async with ctx.sessionmaker() as session:
        bills = await issue_monthly_bills(session, period)
        await session.commit()
    return {"period": period, "bills": len(bills)}


def register() -> None:
    """Register the domain's job kinds (idempotent: registering again replaces the same handler)."""
    # Background bookkeeping, not inference: the aggregation category is the work queue's other one.
    workqueue.register(MONTHLY_BILLS_JOB, run_monthly_bills_job, category=WorkKind.AGGREGATION)
