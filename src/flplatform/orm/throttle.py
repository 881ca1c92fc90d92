"""Counters of the login throttle when they are shared through the database (flplatform.auth.throttle_storage)."""

from __future__ import annotations

from sqlalchemy import Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from flplatform.orm.base import Base


class RateLimitCounter(Base):
    """One fixed-window counter of the ``limits`` library: its key, count and end (Unix time)."""

    __tablename__ = "rate_limit_counters"

    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
