"""Trainings: one global model, an actor, participants, a state machine and options."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import JSON, Boolean, Column, ForeignKey, Integer, String, Table, event
from sqlalchemy.orm import Mapped, mapped_column, relationship

from flplatform.orm.base import Base, IDMixin, TimestampMixin, UTCDateTime, str_enum, utcnow
from flplatform.orm.model import Model
from flplatform.orm.user import User


class TrainingState(enum.StrEnum):
    INITIAL = "I"
    ONGOING = "O"
    COMPLETED = "C"
    ERROR = "E"
    SWAG_ROUND = "S"


class AggregationMethod(enum.StrEnum):
    FED_AVG = "FedAvg"
    FED_DC = "FedDC"
    FED_PROX = "FedProx"


class UncertaintyMethod(enum.StrEnum):
    NONE = "NONE"
    ENSEMBLE = "ENSEMBLE"
    MC_DROPOUT = "MC_DROPOUT"
    SWAG = "SWAG"


training_participants = Table(
    "training_participants",
    Base.metadata,
    Column("training_id", ForeignKey("trainings.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True),
    Column("joined_at", UTCDateTime(), nullable=False, default=utcnow),
)


class Training(IDMixin, TimestampMixin, Base):
    __tablename__ = "trainings"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), unique=True)
    actor_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    state: Mapped[TrainingState] = mapped_column(
        str_enum(TrainingState, "training_state"), default=TrainingState.INITIAL, index=True
    )
    target_num_updates: Mapped[int] = mapped_column(Integer)
    last_update: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    uncertainty_method: Mapped[UncertaintyMethod] = mapped_column(
        str_enum(UncertaintyMethod, "uncertainty_method"), default=UncertaintyMethod.NONE
    )
    aggregation_method: Mapped[AggregationMethod] = mapped_column(
        str_enum(AggregationMethod, "aggregation_method"), default=AggregationMethod.FED_AVG
    )
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    error_reason: Mapped[str | None] = mapped_column(String(2000))

    model: Mapped[Model] = relationship(lazy="raise")
    actor: Mapped[User] = relationship(foreign_keys=[actor_id], lazy="raise")
    participants: Mapped[list[User]] = relationship(secondary=training_participants, lazy="raise")


def daisy_chain_period(options: dict[str, Any] | None) -> int:
    value = (options or {}).get("daisy_chain_period", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@event.listens_for(Training, "before_insert")
def _daisy_chain_target(_mapper: Any, _connection: Any, training: Training) -> None:
    """The seed's post-save rule: with daisy chaining every "update" is one local round, so the
    number of updates is the number of aggregation rounds times the daisy-chain period."""
    period = daisy_chain_period(training.options)
    if period > 0:
        training.target_num_updates = training.target_num_updates * period
