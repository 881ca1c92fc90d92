"""The audit log (seed 004's logger: timestamp, level, module, function, message, host, ip).

Call :func:`record` from any service, in the request's session: the row commits with the
change it describes, or not at all. It only ever inserts.

    from flplatform import audit
    await audit.record(session, "permissions.role_granted", f"{user} is now admin of {org}",
                       actor=caller, request=request, organisation_id=org.id)
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
import uuid
from typing import Any

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.kit.pagination import paginate
from flplatform.orm.audit import AuditLevel, AuditLog

_HOST = socket.gethostname()


def client_ip(request: Request | None) -> str | None:
    if request is None or request.client is None:
        return None
    return request.client.host


async def record(
    session: AsyncSession,
    action: str,
    message: str = "",
    *,
    level: AuditLevel | str = AuditLevel.INFO,
    actor: Any = None,
    subject_user_id: uuid.UUID | None = None,
    organisation_id: uuid.UUID | None = None,
    request: Request | None = None,
    ip: str | None = None,
    module: str | None = None,
    function: str | None = None,
    count: int = 1,
) -> AuditLog:
    """Append one audit row. ``actor`` is a user (or its id); ``module``/``function`` default to
    the caller's."""
    if module is None or function is None:
        frame = sys._getframe(1)
        module = module or frame.f_globals.get("__name__", "?")
        function = function or frame.f_code.co_name
    actor_id = getattr(actor, "id", actor)
    row = AuditLog(
        level=AuditLevel(level),
        action=action[:64],
        module=module[:200],
        function=function[:200],
        message=message,
        host=_HOST[:255],
        ip=ip or client_ip(request),
        actor_id=actor_id,
        subject_user_id=subject_user_id,
        organisation_id=organisation_id,
        count=count,
    )
    session.add(row)
    await session.flush()
    return row


async def record_detached(sessionmaker: Any, action: str, message: str = "", **kw: Any) -> None:
    """Record in a session of its own and commit at once: for events whose request is about to
    fail and roll back (failed logins, refused tokens)."""
    if "module" not in kw or "function" not in kw:
        frame = sys._getframe(1)
        kw.setdefault("module", frame.f_globals.get("__name__", "?"))
        kw.setdefault("function", frame.f_code.co_name)
    async with sessionmaker() as session:
        await record(session, action, message, **kw)
        await session.commit()


async def list_entries(
    session: AsyncSession,
    *,
    action: str | None = None,
    level: AuditLevel | None = None,
    actor_id: uuid.UUID | None = None,
    organisation_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[AuditLog], int]:
    """A page of the log, newest first (``action`` is a prefix), and the total count."""
    conditions: list[Any] = []
    if action is not None:
        conditions.append(AuditLog.action.startswith(action, autoescape=True))
    if level is not None:
        conditions.append(AuditLog.level == level)
    if actor_id is not None:
        conditions.append(AuditLog.actor_id == actor_id)
    if organisation_id is not None:
        conditions.append(AuditLog.organisation_id == organisation_id)
    if since is not None:
        conditions.append(AuditLog.timestamp >= since)
    return await paginate(
        session,
        select(AuditLog).where(*conditions),
        order_by=(AuditLog.timestamp.desc(), AuditLog.id),
        limit=limit,
        offset=offset,
    )
