"""The append-only audit trail (seed 004's ``EasyAutoMLLogger``): who did what, from where.
Billing, authentication and user administration write it."""

from __future__ import annotations

import datetime as dt
import enum
import uuid

from sqlalchemy import (
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from flplatform.orm.base import Base, IDMixin, str_enum, utcnow


class AuditLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class AuditLog(IDMixin, Base):
    """Seed 004's ``EasyAutoMLLogger`` as an append-only audit trail."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_organisation_id_timestamp", "organisation_id", "timestamp"),)

    timestamp: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    level: Mapped[AuditLevel] = mapped_column(str_enum(AuditLevel, "audit_level"), default=AuditLevel.INFO)
    action: Mapped[str] = mapped_column(String(64), index=True)  # e.g. "billing.top_up", "auth.login_failed"
    module: Mapped[str] = mapped_column(String(200))
    function: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text, default="")
    host: Mapped[str] = mapped_column(String(255))
    ip: Mapped[str | None] = mapped_column(String(64))
    actor_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    subject_user_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    organisation_id: Mapped[uuid.UUID | None]
    # How many occurrences the row stands for (failed logins are one row per name, address and window).
    count: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
