"""``Idempotency-Key`` for charging POSTs (Stripe's contract, Brandur Leach's one-transaction
recipe): the key row is claimed with ``INSERT … ON CONFLICT DO NOTHING`` in the request's own
transaction, the handler runs, and its response is stored in that same transaction.

* same key, same request → the stored status and body are replayed (``Idempotent-Replayed: true``);
* same key, different request (path or body) → 422 ``idempotency_key_mismatch``;
* a concurrent request with the same key waits on the unique index (PostgreSQL) until the first
  commits, then replays it; if the first failed (e.g. 402) nothing was stored and it runs anew.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.billing.ledger import _insert
from flplatform.errors import BadRequest, Conflict, Unprocessable
from flplatform.orm.base import utcnow
from flplatform.orm.billing import IdempotencyKey

# The header every charging POST accepts (routers.billing, routers.billing_ledger).
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Any unique string (a UUID4 is best). Retrying with the same key replays the first "
        "response instead of charging again; reusing it for a different request is a 422.",
        max_length=255,
    ),
]

MAX_KEY_LENGTH = 255


def request_fingerprint(method: str, path: str, body: BaseModel | dict[str, Any] | None) -> str:
    payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    text = json.dumps({"method": method, "path": path, "body": payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


async def idempotent(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    key: str | None,
    fingerprint: str,
    handler: Callable[[], Awaitable[tuple[int, Any]]],
) -> JSONResponse:
    """Run ``handler`` (returning ``(status, payload)``) at most once per (user, key)."""
    if key is None:
        status, payload = await handler()
        return JSONResponse(jsonable_encoder(payload), status_code=status)
    if not key or len(key) > MAX_KEY_LENGTH:
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.", code="invalid_idempotency_key"
        )
    claimed = (
        await session.execute(
            _insert(session, IdempotencyKey)
            .values(id=uuid.uuid4(), user_id=user_id, key=key, fingerprint=fingerprint, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["user_id", "key"])
            .returning(IdempotencyKey.id)
        )
    ).first()
    if claimed is None:
        row = (
            await session.execute(
                select(IdempotencyKey).where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
            )
        ).scalar_one()
        if row.fingerprint != fingerprint:
            raise Unprocessable(
                "This Idempotency-Key was used with a different request.", code="idempotency_key_mismatch"
            )
        if row.status_code is None:
            raise Conflict(
                "A request with this Idempotency-Key is in progress.", code="idempotency_key_in_progress"
            )
        return JSONResponse(
            row.response, status_code=row.status_code, headers={"Idempotent-Replayed": "true"}
        )
    status, payload = await handler()
    content = jsonable_encoder(payload)
    await session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.id == claimed.id)
        .values(status_code=status, response=content)
        .execution_options(synchronize_session=False)
    )
    return JSONResponse(content, status_code=status)
