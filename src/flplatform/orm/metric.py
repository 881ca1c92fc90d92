"""Metrics reported on a model (test metrics on global models, training metrics on local ones)."""

from __future__ import annotations

import uuid

from sqlalchemy import Float, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from flplatform.orm.base import Base, IDMixin, TimestampMixin
from flplatform.orm.model import Model
from flplatform.orm.user import User


class Metric(IDMixin, TimestampMixin, Base):
    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_model_id_step", "model_id", "step"),)

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    identifier: Mapped[str | None] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(128))
    value_float: Mapped[float | None] = mapped_column(Float)
    value_binary: Mapped[bytes | None] = mapped_column(LargeBinary)
    step: Mapped[int] = mapped_column(Integer, default=0)
    reporter_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )

    model: Mapped[Model] = relationship(lazy="raise")
    reporter: Mapped[User | None] = relationship(lazy="raise")
