"""Worker bookkeeping (seed ``Server`` / ``Work``): servers register, jobs move
waiting → processing → finished | error through one status column."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import Conflict, NotFound
from flplatform.orm.base import utcnow
from flplatform.orm.workqueue import Server, Work, WorkKind, WorkStatus
from flplatform.workqueue.servers import register_server  # noqa: F401 - re-exported (seed API)


async def create_work(
    session: AsyncSession,
    kind: WorkKind,
    *,
    model_id: uuid.UUID | None = None,
    estimate_seconds: float | None = None,
) -> Work:
    work = Work(kind=kind, model_id=model_id, duration_estimate_seconds=estimate_seconds)
    session.add(work)
    await session.flush()
    return work


async def _transition(
    session: AsyncSession, work_id: uuid.UUID, allowed: tuple[WorkStatus, ...], **values: Any
) -> Work:
    result = await session.execute(
        update(Work)
        .where(Work.id == work_id, Work.status.in_(allowed))
        .values(**values)
        .returning(Work.id)
        .execution_options(synchronize_session=False)
    )
    work = await session.get(Work, work_id, populate_existing=True)
    if work is None:
        raise NotFound(f"Work {work_id} not found.")
    if result.first() is None:
        raise Conflict(f"Work {work_id} is {work.status.value}.", code="work_state")
    return work


async def start_work(session: AsyncSession, work_id: uuid.UUID, server: Server | None = None) -> Work:
    return await _transition(
        session,
        work_id,
        (WorkStatus.WAITING,),
        status=WorkStatus.PROCESSING,
        started_at=utcnow(),
        server_id=server.id if server else None,
    )


async def finish_work(
    session: AsyncSession, work_id: uuid.UUID, *, error: dict[str, Any] | None = None
) -> Work:
    return await _transition(
        session,
        work_id,
        (WorkStatus.WAITING, WorkStatus.PROCESSING),
        status=WorkStatus.ERROR if error else WorkStatus.FINISHED,
        finished_at=utcnow(),
        error=error,
    )
