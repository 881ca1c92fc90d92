"""The trainings domain's work-queue job: ``training.aggregate`` (one claimed round's
aggregation). :func:`register` adds it to the work queue; ``flplatform.jobs.install()`` calls
it in every entry point — nothing registers at import time."""

from __future__ import annotations

import asyncio
from typing import Any

from flplatform import workqueue
from flplatform.kit import malloc, timeline
from flplatform.orm.workqueue import WorkKind
from flplatform.trainings.runtime import AGGREGATE_JOB, AggregationJob, TrainingRuntime


async def run_aggregation_job(ctx: workqueue.JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Work-queue handler of ``training.aggregate``: in a server process it uses that process's
    runtime (its notification dispatcher is kicked at once); in ``flplatform worker`` a runtime of
    its own (the servers' dispatchers deliver the outbox on their next sweep)."""
    runtime: TrainingRuntime | None = (
        getattr(ctx.app.state, "training_runtime", None) if ctx.app is not None else None
    )
    if runtime is None:
        runtime = ctx.shared.get("training_runtime")
        if runtime is None:
            runtime = ctx.shared["training_runtime"] = TrainingRuntime(
                sessionmaker=ctx.sessionmaker, settings=ctx.settings
            )
    training_id, job = AggregationJob.from_payload(payload)
    with timeline.opened(training_id, f"close training={training_id} round={job.round} kind={job.kind}"):
        timeline.mark("job_started")
        report: dict[str, Any] = {}
        committed = await runtime.aggregate(training_id, job, report)
        # A round's close frees model-sized buffers (the uploads' and its own) that glibc keeps cached
        # in its arenas: hand them back to the kernel before the next round's uploads (a few ms, in a
        # thread; the next round has already started). Trimming before the close as well measured no
        # lower peak (docs/performance.md, quiet-machine runs).
        await asyncio.to_thread(malloc.trim)
        timeline.mark("trimmed")
    # report: how many updates were folded on arrival in this process (None: none, all at the close)
    return {
        "training_id": str(training_id),
        "round": job.round,
        "kind": job.kind,
        "committed": committed,
        **report,
    }


def register() -> None:
    """Register the domain's job kinds (idempotent: registering again replaces the same handler)."""
    workqueue.register(AGGREGATE_JOB, run_aggregation_job, category=WorkKind.AGGREGATION)
