"""The work queue's rows: a ``QueuedWork`` **is a** billing ``Work`` (joined-table inheritance).

``works`` (owned by billing) keeps what the seed's Work has — category (aggregation/inference),
status (waiting → processing → finished | error), timings, duration estimate, the server that
runs it, the error. ``queued_works`` adds what a queue needs: the handler name, the JSON payload,
a unique de-duplication key, the lease and the claim counter used as a fencing token, the
JSON result, and the user who submitted it (jobs users start and poll, e.g. inference jobs).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from flplatform.orm.billing import Work


class QueuedWork(Work):
    __tablename__ = "queued_works"

    id: Mapped[uuid.UUID] = mapped_column(ForeignKey("works.id", ondelete="CASCADE"), primary_key=True)
    handler: Mapped[str] = mapped_column(
        String(100), index=True
    )  # registered handler, e.g. "aggregate_round"
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Enqueueing the same key again returns the existing job (retried requests, two workers).
    dedupe_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    # Incremented by every claim; renewals and the final update must carry the claim's value,
    # so a worker whose lease was taken over can no longer touch the job.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    # While processing: the job belongs to its claimer until then; afterwards any worker reclaims it.
    lease_until: Mapped[dt.datetime | None] = mapped_column(index=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Who may see the job (a user's own jobs, e.g. ``inference.run``); None for system jobs such
    # as aggregations. A deleted user's jobs stay (their Work rows are accounted) but lose the owner.
    submitter_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
