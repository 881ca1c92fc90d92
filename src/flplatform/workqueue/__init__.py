"""A PostgreSQL work queue for background jobs (aggregation rounds, …) shared by every worker
process on every host; on SQLite one in-process worker.

Jobs are billing's ``Work`` rows (seed ``Work``: category, status waiting → processing →
finished | error, timings, estimate, server) extended by ``QueuedWork`` (handler kind, JSON
payload, unique de-duplication key, lease). Workers are ``Server`` rows with a heartbeat.

Public API::

    from flplatform import workqueue

    workqueue.register("my_kind", handler, category=WorkKind.AGGREGATION)   # or @workqueue.handler(...)
    async def handler(ctx: workqueue.JobContext, payload: dict) -> dict | None: ...

    job = await workqueue.enqueue(session, "my_kind", {"x": 1}, dedupe_key="thing:1")
    # the caller commits; then this process's workers wake at once, others by NOTIFY or polling

    await workqueue.run_worker(sessionmaker, settings, stop=event)   # what `flplatform worker` runs

Synchronous inference (``POST /api/inference/``) runs inside its HTTP request (the caller waits
on that connection, and the loaded module sits in that process's cache); it is recorded as a
``QueuedWork`` row of category inference, claimed and finished by the serving process and
written in batches off the response path (:class:`CompletedWorkLog`, ``app.state.work_log``).
Asynchronous inference (``POST /api/inference/jobs/``) is a queued ``inference.run`` job that any
worker claims (``inference.jobs``); its submitter polls it.

``flplatform serve`` runs one worker in each server process (``FLP_INPROCESS_WORKER=true``, the
default; lifespan component :func:`workqueue_component`). Execution is at-least-once: a job
whose worker died (lease ``FLP_WORK_LEASE_SECONDS`` not renewed) runs again elsewhere, so
handlers must be idempotent.
"""

from flplatform.workqueue.queue import (
    ClaimedJob,
    claim,
    enqueue,
    fail,
    finish,
    get_job,
    release,
    renew,
    wake_local_workers_after_commit,
)
from flplatform.workqueue.records import CompletedWorkLog
from flplatform.workqueue.registry import JobContext, handler, lookup, register, registered_kinds
from flplatform.workqueue.worker import (
    Worker,
    gpu_memory,
    run_worker,
    workqueue_component,
)

__all__ = [
    "ClaimedJob",
    "CompletedWorkLog",
    "JobContext",
    "Worker",
    "claim",
    "enqueue",
    "fail",
    "finish",
    "get_job",
    "gpu_memory",
    "handler",
    "lookup",
    "register",
    "registered_kinds",
    "release",
    "renew",
    "run_worker",
    "wake_local_workers_after_commit",
    "workqueue_component",
]
