"""The work queue's rows: the worker processes (``Server``, seed 004) and their jobs. A
``QueuedWork`` **is a** ``Work`` (joined-table inheritance).

``works`` keeps what the seed's Work has — category (aggregation/inference),
status (waiting → processing → finished | error), timings, duration estimate, the server that
runs it, the error. ``queued_works`` adds what a queue needs: the handler name, the JSON payload,
a unique de-duplication key, the lease and the claim counter used as a fencing token, the
JSON result, and the user who submitted it (jobs users start and poll, e.g. inference jobs).
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from flplatform.orm.base import Base, IDMixin, str_enum, utcnow


class Server(IDMixin, Base):
    """A worker process that runs aggregations and inference (seed ``Server``)."""

    __tablename__ = "servers"

    name: Mapped[str] = mapped_column(String(100), unique=True)
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    gpu_memory: Mapped[list[int]] = mapped_column(JSON, default=list)  # bytes per GPU
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WorkKind(enum.StrEnum):
    AGGREGATION = "aggregation"  # seed: is_work_training
    INFERENCE = "inference"  # seed: is_work_solving


class WorkStatus(enum.StrEnum):
    WAITING = "waiting"
    PROCESSING = "processing"
    FINISHED = "finished"
    ERROR = "error"


class Work(IDMixin, Base):
    """One aggregation or inference job. One ``status`` column with a CHECK constraint replaces the
    seed's four booleans, and finished/error jobs must carry their finish time."""

    __tablename__ = "works"
    __table_args__ = (
        CheckConstraint(
            "(status IN ('finished', 'error')) = (finished_at IS NOT NULL)", name="finished_iff_final"
        ),
        CheckConstraint("status <> 'processing' OR started_at IS NOT NULL", name="processing_started"),
        Index("ix_works_status_created_at", "status", "created_at"),
    )

    kind: Mapped[WorkKind] = mapped_column(str_enum(WorkKind, "work_kind"))
    status: Mapped[WorkStatus] = mapped_column(
        str_enum(WorkStatus, "work_status"), default=WorkStatus.WAITING
    )
    model_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), index=True
    )
    server_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("servers.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    duration_estimate_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)


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
