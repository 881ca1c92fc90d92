"""A training's recent events (round started, update received, aggregation finished, ...), the
history behind ``GET /api/trainings/{id}/events/`` (Server-Sent Events).

Each training numbers its events 1, 2, 3, ... (``seq``, the SSE event id): the counter row in
``training_event_heads`` is bumped in the transaction that records the event, so two
transactions recording events of one training take their numbers in commit order, and a
subscriber that has read up to ``seq`` n never misses a later-committed event with a smaller
number. Only the newest ``FLP_TRAINING_EVENTS_KEEP`` events of a training are kept.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from flplatform.orm.base import Base, utcnow


class TrainingEventHead(Base):
    """The last event number handed out per training."""

    __tablename__ = "training_event_heads"

    training_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("trainings.id", ondelete="CASCADE"), primary_key=True
    )
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)


class TrainingEvent(Base):
    __tablename__ = "training_events"

    training_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("trainings.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(40))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
