"""The audit log route (administrators): billing operations, price changes, tokens, failed
logins and permission changes, newest first."""

from __future__ import annotations

import uuid

from fastapi import Response

from flplatform import audit
from flplatform.auth.dependencies import SuperUser
from flplatform.billing.schemas import AuditRead
from flplatform.db import SessionDep
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Limit, Offset, SafeDateTime
from flplatform.orm.audit import AuditLevel

router = APIRouter(prefix="/api/audit-log", tags=["audit"])


@router.get(
    "/",
    response_model=list[AuditRead],
    summary="Audit log (admin)",
    description="Billing operations, price changes, token creation/revocation, failed logins and "
    "permission changes, newest first. `X-Total-Count` carries the total.",
    responses=responses(401, 403, 422),
)
async def list_audit(
    session: SessionDep,
    response: Response,
    _admin: SuperUser,
    action: str | None = None,
    level: AuditLevel | None = None,
    actor_id: uuid.UUID | None = None,
    organisation_id: uuid.UUID | None = None,
    since: SafeDateTime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[AuditRead]:
    rows, total = await audit.list_entries(
        session,
        action=action,
        level=level,
        actor_id=actor_id,
        organisation_id=organisation_id,
        since=since,
        limit=limit,
        offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [AuditRead.model_validate(r) for r in rows]
