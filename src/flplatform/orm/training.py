"""Trainings: one global model, an actor, participants, a state machine and options."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    select,
)
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


# States in which rounds run (a training's models may not be deleted, its sweeper looks at it).
ACTIVE_STATES = (TrainingState.ONGOING, TrainingState.SWAG_ROUND)


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
    # The tenant: the global model's organisation (None in the DLR space); filled on insert
    # by ``_fill_tenant`` below.
    organization_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("collections.id"), index=True)
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
    # metric_names, phase and start_round keep the server defaults with which 0101 added them to
    # existing rows, declared here so that autogenerate compares them.
    # Metric names the actor expects in test rounds (the reference parsed and dropped them).
    metric_names: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    # What the current round waits for: client updates, test metrics on the new global
    # model, or (state S) SWAG statistics. See trainings/service.py for the state machine.
    phase: Mapped[str] = mapped_column(String(16), default="update", server_default="update")
    # The global model's round when the training started: target_num_updates counts from here.
    start_round: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    phase_started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Lease of ``locked``: a crashed aggregation never leaves the training stuck.
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The aggregator's state between rounds (FedOpt moments, round counter): the digest of a
    # safetensors blob in the blob store (flplatform.blobs).
    aggregator_state_digest: Mapped[str | None] = mapped_column(String(64))
    # The round whose recorded client selection (``training_round_selections``) is the set the
    # current phase waits for; None (trainings from before 0904): every participant.
    selection_round: Mapped[int | None] = mapped_column(Integer)

    model: Mapped[Model] = relationship(lazy="raise")
    actor: Mapped[User] = relationship(foreign_keys=[actor_id], lazy="raise")
    participants: Mapped[list[User]] = relationship(secondary=training_participants, lazy="raise")


def daisy_chain_period(options: dict[str, Any] | None) -> int:
    value = (options or {}).get("daisy_chain_period", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@event.listens_for(Training, "before_insert")
def _fill_tenant(_mapper: Any, connection: Any, training: Training) -> None:
    """A training belongs to its global model's organisation."""
    if training.organization_id is None:
        training.organization_id = connection.execute(
            select(Model.organization_id).where(Model.id == training.model_id)
        ).scalar()


@event.listens_for(Training, "before_insert")
def _daisy_chain_target(_mapper: Any, _connection: Any, training: Training) -> None:
    """The seed's post-save rule: with daisy chaining every "update" is one local round, so the
    number of updates is the number of aggregation rounds times the daisy-chain period."""
    period = daisy_chain_period(training.options)
    if period > 0:
        training.target_num_updates = training.target_num_updates * period


class SwagStatistic(IDMixin, TimestampMixin, Base):
    """One participant's SWAG moments for one round (kept apart from test metrics)."""

    __tablename__ = "swag_statistics"
    __table_args__ = (UniqueConstraint("training_id", "round", "reporter_id"),)

    training_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("trainings.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    reporter_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    sample_size: Mapped[int] = mapped_column(Integer)
    # Flat float tensors in parameter order: digests of safetensors blobs (key "moment").
    first_moment_digest: Mapped[str | None] = mapped_column(String(64))
    second_moment_digest: Mapped[str | None] = mapped_column(String(64))
    num_parameters: Mapped[int] = mapped_column(BigInteger, default=0)


class NotificationStatus(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    REJECTED = "rejected"
    FAILED = "failed"
    DROPPED = "dropped"


class Notification(Base):
    """Outbox: notifications are written in the transaction of the state change that causes
    them and delivered by the dispatcher after commit (at least once, per recipient in order)."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_status_next_attempt_at", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    training_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("trainings.id", ondelete="CASCADE"), index=True
    )
    recipient_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    endpoint: Mapped[str | None] = mapped_column(String(2048))
    notification_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)
    # Round-driving notifications: a rejection removes the client, a transport failure after
    # the retries puts the training into Error. Informational ones only log failures.
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[NotificationStatus] = mapped_column(
        str_enum(NotificationStatus, "notification_status"), default=NotificationStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(String(2000))
    response_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
