"""Queue operations on ``QueuedWork`` rows: enqueue, claim, renew, finish, fail.

Claiming on PostgreSQL is ``SELECT … FOR UPDATE OF works SKIP LOCKED``: any number of worker
processes on any number of hosts take distinct jobs without waiting on each other. On SQLite
(one writer, one process) the same code runs without the row lock and the status update is a
compare-and-set (``UPDATE … WHERE status = <what was read>``), which is enough there.

Every claim increments ``attempts``; that number is the claim's fencing token. Renewing the
lease and recording the outcome only succeed while the job is still processing under the same
token, so a worker that stalled past its lease (and whose job another worker took over) can no
longer overwrite anything. Locks are always taken ``works`` row first, so claimers and
finishers cannot deadlock.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, exists, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.errors import AppError
from flplatform.kit import metrics
from flplatform.orm.base import utcnow
from flplatform.orm.workqueue import QueuedWork, Work, WorkKind, WorkStatus
from flplatform.workqueue.registry import category_of, lookup, registered_kinds
from flplatform.workqueue.tables import QUEUED_WORK, WORK

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "flp_work"
MAX_ERROR_CHARS = 4000
#: A job enqueued with ``prefer_local`` waits this long for the enqueuing process's own worker
#: before any other worker may claim it (see :func:`enqueue`).
LOCAL_HEAD_START_SECONDS = 1.0

LOCAL_WORKERS: weakref.WeakSet[Any] = weakref.WeakSet()  # this process's workers (they have kick())


def wake_local_workers_after_commit(session: AsyncSession) -> None:
    """Wake this process's idle workers once ``session`` commits (a rollback wakes nobody; a
    listener left over from a rolled-back transaction only causes one harmless extra look)."""
    sync_session = session.sync_session
    if sync_session.info.get("workqueue_wake"):
        return
    sync_session.info["workqueue_wake"] = True

    def _after_commit(_: Any) -> None:
        sync_session.info.pop("workqueue_wake", None)
        for worker in list(LOCAL_WORKERS):
            worker.kick()

    event.listen(sync_session, "after_commit", _after_commit, once=True)


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job, detached from any session."""

    id: uuid.UUID
    kind: str
    payload: dict[str, Any]
    attempt: int
    lease_until: dt.datetime


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def enqueue(
    session: AsyncSession,
    kind: str,
    payload: dict[str, Any] | None = None,
    *,
    dedupe_key: str | None = None,
    model_id: uuid.UUID | None = None,
    estimate_seconds: float | None = None,
    max_attempts: int = 5,
    submitter_id: uuid.UUID | None = None,
    prefer_local: bool = False,
) -> QueuedWork:
    """Add a job in the caller's transaction (it becomes visible when the caller commits).

    With ``dedupe_key`` an existing job with that key is returned instead of a new one, whatever
    its status: enqueueing is idempotent, so retried requests and racing workers are harmless.
    ``submitter_id``: the user the job belongs to (who may poll it), for jobs users submit.
    ``prefer_local``: the job is reserved for this process's own worker (its ``server_id`` is set
    while it waits) for :data:`LOCAL_HEAD_START_SECONDS`, then any worker claims it as usual —
    for jobs that run faster where they were enqueued (a round's close in the process that folded
    its updates). Without a worker in this process nothing is reserved.
    """
    category: WorkKind = category_of(kind)  # raises for an unregistered kind
    if dedupe_key is not None:
        existing = await _by_key(session, dedupe_key)
        if existing is not None:
            return existing
    job = QueuedWork(
        kind=category,
        handler=kind,
        payload=payload or {},
        dedupe_key=dedupe_key,
        model_id=model_id,
        duration_estimate_seconds=estimate_seconds,
        status=WorkStatus.WAITING,
        attempts=0,
        max_attempts=max_attempts,
        submitter_id=submitter_id,
        server_id=_local_server(kind) if prefer_local else None,
    )
    if dedupe_key is not None and _is_postgres(session):
        # Two transactions enqueueing the same key: the second INSERT waits for the first to
        # commit, then hits the unique index; the savepoint keeps the caller's transaction usable.
        try:
            async with session.begin_nested():
                session.add(job)
                await session.flush()
        except IntegrityError:
            existing = await _by_key(session, dedupe_key)
            if existing is None:
                raise
            return existing
    else:
        session.add(job)
        await session.flush()
    wake_local_workers_after_commit(session)
    if _is_postgres(session):
        # Wakes idle workers everywhere when the transaction commits (nothing is sent on rollback).
        await session.execute(
            text("SELECT pg_notify(:channel, :kind)"), {"channel": NOTIFY_CHANNEL, "kind": kind}
        )
    return job


def _local_server(kind: str) -> uuid.UUID | None:
    """The server id of a running (registered) worker of this process that takes ``kind``, if any."""
    for worker in list(LOCAL_WORKERS):
        kinds = getattr(worker, "kinds", None)
        if getattr(worker, "server_id", None) is not None and (kinds is None or kind in kinds):
            return worker.server_id
    return None


async def _by_key(session: AsyncSession, dedupe_key: str) -> QueuedWork | None:
    stmt = (
        select(QueuedWork)
        .where(QueuedWork.dedupe_key == dedupe_key)
        .execution_options(populate_existing=True)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_job(session: AsyncSession, job_id: uuid.UUID) -> QueuedWork | None:
    stmt = select(QueuedWork).where(QueuedWork.id == job_id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def claim(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    lease_seconds: float,
    server_id: uuid.UUID | None = None,
    kinds: list[str] | None = None,
) -> ClaimedJob | None:
    """Take the oldest waiting job, or a processing one whose lease expired; commit the claim.
    A waiting job reserved for another server (``enqueue(prefer_local=True)``) is left to it for
    :data:`LOCAL_HEAD_START_SECONDS` after it was enqueued."""
    for _ in range(5):  # on SQLite a lost compare-and-set just means: look again
        async with sessionmaker() as session:
            now = utcnow()
            head_start = now - dt.timedelta(seconds=LOCAL_HEAD_START_SECONDS)
            free = or_(Work.server_id.is_(None), Work.created_at <= head_start)
            if server_id is not None:
                free = or_(free, Work.server_id == server_id)
            due = or_(
                (Work.status == WorkStatus.WAITING) & free,
                (Work.status == WorkStatus.PROCESSING) & (QueuedWork.lease_until < now),
            )
            stmt = select(QueuedWork).where(due).order_by(Work.created_at).limit(1)
            if kinds is not None:
                stmt = stmt.where(QueuedWork.handler.in_(kinds))
            if _is_postgres(session):
                stmt = stmt.with_for_update(skip_locked=True, of=WORK)
            job = (await session.execute(stmt)).scalar_one_or_none()
            if job is None:
                return None
            seen_status, seen_attempts = job.status, job.attempts
            if seen_status == WorkStatus.PROCESSING and seen_attempts >= job.max_attempts:
                log.error(
                    "job %s (%s): lease expired %d times; giving up", job.id, job.handler, seen_attempts
                )
                await _final(
                    session,
                    job.id,
                    job.handler,
                    seen_attempts,
                    WorkStatus.ERROR,
                    error={
                        "message": f"worker lost the job {seen_attempts} times (lease expired)",
                        "type": "LeaseExpired",
                    },
                )
                await session.commit()
                continue
            if seen_status == WorkStatus.PROCESSING:
                log.warning(
                    "job %s (%s): lease of claim %d expired; reclaiming", job.id, job.handler, seen_attempts
                )
            lease_until = now + dt.timedelta(seconds=lease_seconds)
            moved = await session.execute(
                update(Work)
                .where(Work.id == job.id, Work.status == seen_status)
                .values(status=WorkStatus.PROCESSING, started_at=now, server_id=server_id)
                .returning(Work.id)
                .execution_options(synchronize_session=False)
            )
            if moved.first() is None:
                await session.rollback()
                continue
            # The attempt count is the claim's fence. PostgreSQL re-checks a locked row against
            # its newest version but keeps the queue row of its snapshot: a rival's takeover can
            # have moved the count since we read it. Then the job is the rival's; look again.
            counted = await session.execute(
                update(QUEUED_WORK)
                .where(QUEUED_WORK.c.id == job.id, QUEUED_WORK.c.attempts == seen_attempts)
                .values(attempts=seen_attempts + 1, lease_until=lease_until)
                .returning(QUEUED_WORK.c.id)
            )
            if counted.first() is None:
                await session.rollback()
                continue
            if seen_status == WorkStatus.WAITING:  # first claim: how long it waited in the queue
                metrics.observe_job_wait(job.handler, (now - job.created_at).total_seconds())
            claimed = ClaimedJob(
                id=job.id,
                kind=job.handler,
                payload=dict(job.payload or {}),
                attempt=seen_attempts + 1,
                lease_until=lease_until,
            )
            await session.commit()
            return claimed
    return None


async def depth(session: AsyncSession) -> dict[tuple[str, str], int]:
    """Jobs waiting and processing now, by kind and status (every registered kind, 0 included):
    the queue depth ``/metrics`` reports, read from the database so it is the same everywhere."""
    counts = {(kind, status.value): 0 for kind in registered_kinds() for status in _OPEN}
    stmt = (
        select(QueuedWork.handler, QueuedWork.status, func.count())
        .where(QueuedWork.status.in_(_OPEN))
        .group_by(QueuedWork.handler, QueuedWork.status)
    )
    for kind, status, count in (await session.execute(stmt)).all():
        counts[(kind, WorkStatus(status).value)] = int(count)
    return counts


_OPEN = (WorkStatus.WAITING, WorkStatus.PROCESSING)


def _owned_by(job_id: uuid.UUID, attempt: int) -> Any:
    queued = QUEUED_WORK
    return exists().where(queued.c.id == job_id, queued.c.attempts == attempt)


async def renew(
    sessionmaker: async_sessionmaker[AsyncSession], job: ClaimedJob, lease_seconds: float
) -> bool:
    """Extend the lease of a running job; False when the claim was lost (the lease had expired
    and another worker took the job over)."""
    queued = QUEUED_WORK
    async with sessionmaker() as session:
        until = utcnow() + dt.timedelta(seconds=lease_seconds)
        still_processing = exists().where(WORK.c.id == job.id, WORK.c.status == WorkStatus.PROCESSING.value)
        result = await session.execute(
            update(queued)
            .where(queued.c.id == job.id, queued.c.attempts == job.attempt, still_processing)
            .values(lease_until=until)
            .returning(queued.c.id)
        )
        ok = result.first() is not None
        await session.commit()
    return ok


async def finish(
    sessionmaker: async_sessionmaker[AsyncSession], job: ClaimedJob, result: dict[str, Any] | None = None
) -> bool:
    """Record success; False (and nothing written) when the claim was lost meanwhile."""
    async with sessionmaker() as session:
        ok = await _final(session, job.id, job.kind, job.attempt, WorkStatus.FINISHED, result=result)
        await session.commit()
    return ok


async def fail(
    sessionmaker: async_sessionmaker[AsyncSession], job: ClaimedJob, error: BaseException | str
) -> bool:
    """Record failure with the error text (final: handlers decide themselves what is retryable).
    An :class:`~flplatform.errors.AppError` (a refusal a request would have answered with a 4xx)
    also keeps its machine ``code`` and HTTP ``status``, so a job can report it in the API's shape."""
    detail: dict[str, Any]
    if isinstance(error, BaseException):
        detail = {
            "message": str(error)[:MAX_ERROR_CHARS] or type(error).__name__,
            "type": type(error).__name__,
        }
        if isinstance(error, AppError):
            detail.update(code=error.code, status=error.status_code)
    else:
        detail = {"message": str(error)[:MAX_ERROR_CHARS], "type": "Error"}
    async with sessionmaker() as session:
        ok = await _final(session, job.id, job.kind, job.attempt, WorkStatus.ERROR, error=detail)
        await session.commit()
    return ok


async def release(sessionmaker: async_sessionmaker[AsyncSession], job: ClaimedJob) -> bool:
    """Give a claimed job back (graceful shutdown): waiting again at once, no lease to wait for."""
    async with sessionmaker() as session:
        moved = await session.execute(
            update(Work)
            .where(Work.id == job.id, Work.status == WorkStatus.PROCESSING, _owned_by(job.id, job.attempt))
            .values(status=WorkStatus.WAITING, server_id=None)
            .returning(Work.id)
            .execution_options(synchronize_session=False)
        )
        ok = moved.first() is not None
        if ok:
            await session.execute(
                update(QUEUED_WORK).where(QUEUED_WORK.c.id == job.id).values(lease_until=None)
            )
        await session.commit()
    return ok


async def _final(
    session: AsyncSession,
    job_id: uuid.UUID,
    kind: str,
    attempt: int,
    status: WorkStatus,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    moved = await session.execute(
        update(Work)
        .where(Work.id == job_id, Work.status == WorkStatus.PROCESSING, _owned_by(job_id, attempt))
        .values(status=status, finished_at=utcnow(), error=error)
        .returning(Work.id)
        .execution_options(synchronize_session=False)
    )
    if moved.first() is None:
        return False
    values: dict[str, Any] = {"lease_until": None, "result": result}
    registration = lookup(kind)
    if registration is not None and not registration.keep_payload:
        values["payload"] = {}
    await session.execute(update(QUEUED_WORK).where(QUEUED_WORK.c.id == job_id).values(**values))
    return True
