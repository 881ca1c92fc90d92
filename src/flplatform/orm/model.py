"""Model hierarchy with joined-table inheritance (replaces the seed's Django polymorphism).

``Model`` → ``GlobalModel`` → (``MeanModel``, ``SWAGModel``); ``Model`` → ``LocalModel``.
Querying ``Model`` returns instances of the right subclass: every subclass loads inline
(``polymorphic_load="inline"``), so one SELECT with outer joins builds them, which async
sessions need (no lazy load on attribute access). Model bytes live in the blob store
(:mod:`flplatform.blobs`): rows keep their SHA-256 digest and size, never the bytes.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from flplatform.orm.base import Base, IDMixin, TimestampMixin
from flplatform.orm.user import User


class ModelKind(enum.StrEnum):
    GLOBAL = "global"
    LOCAL = "local"
    MEAN = "mean"
    SWAG = "swag"


def _digest() -> Mapped[str | None]:
    """The SHA-256 (hex) of a blob in the blob store."""
    return mapped_column(String(64))


class Model(IDMixin, TimestampMixin, Base):
    __tablename__ = "models"

    kind: Mapped[str] = mapped_column(String(16), index=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # The tenant (Kolibri's ``dataset_id``): the owner's organisation for uploads, the base
    # model's for local updates; None in the organisation-less DLR space. Set on insert by
    # ``flplatform.orm.tenancy`` so the permission clauses filter on one indexed column.
    organization_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("collections.id"), index=True)
    round: Mapped[int] = mapped_column(Integer, default=0)
    weights_digest: Mapped[str | None] = _digest()
    # "torchscript" | "safetensors": how the weights blob is encoded (uploads are never unpickled).
    weights_format: Mapped[str | None] = mapped_column(String(20))
    weights_size: Mapped[int] = mapped_column(BigInteger, default=0)

    owner: Mapped[User] = relationship(lazy="raise")

    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "model"}


mean_model_members = Table(
    "mean_model_members",
    Base.metadata,
    Column("mean_model_id", ForeignKey("mean_models.id", ondelete="CASCADE"), primary_key=True),
    Column("member_id", ForeignKey("global_models.id", ondelete="CASCADE"), primary_key=True),
)


class GlobalModel(Model):
    __tablename__ = "global_models"

    id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    # e.g. [null, 1, 28, 28]: ints are fixed dimensions, nulls are free ones (batch).
    input_shape: Mapped[list[int | None] | None] = mapped_column(JSON)
    preprocessing_digest: Mapped[str | None] = _digest()
    has_preprocessing: Mapped[bool] = mapped_column(default=False)

    __mapper_args__ = {"polymorphic_identity": ModelKind.GLOBAL.value, "polymorphic_load": "inline"}


class MeanModel(GlobalModel):
    """An ensemble: its forward pass averages the member global models."""

    __tablename__ = "mean_models"

    id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("global_models.id", ondelete="CASCADE"), primary_key=True
    )
    members: Mapped[list[GlobalModel]] = relationship(
        secondary=mean_model_members,
        primaryjoin=lambda: MeanModel.id == mean_model_members.c.mean_model_id,
        secondaryjoin=lambda: GlobalModel.id == mean_model_members.c.member_id,
        lazy="raise",
    )

    __mapper_args__ = {"polymorphic_identity": ModelKind.MEAN.value, "polymorphic_load": "inline"}


class SWAGModel(GlobalModel):
    """SWAG-diagonal posterior: first and second moments of the flat parameter vector."""

    __tablename__ = "swag_models"

    id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("global_models.id", ondelete="CASCADE"), primary_key=True
    )
    swag_first_digest: Mapped[str | None] = _digest()
    swag_second_digest: Mapped[str | None] = _digest()

    __mapper_args__ = {"polymorphic_identity": ModelKind.SWAG.value, "polymorphic_load": "inline"}


class LocalModel(Model):
    """One participant's update for one round of a global model."""

    __tablename__ = "local_models"

    id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    base_model_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("global_models.id", ondelete="CASCADE"), index=True
    )
    sample_size: Mapped[int] = mapped_column(Integer)
    # Asynchronous (FedBuff) trainings: the global version this update was folded into; null while
    # it waits in the buffer. ``round`` is the version it was trained from.
    folded_into: Mapped[int | None] = mapped_column(Integer, nullable=True)

    base_model: Mapped[GlobalModel] = relationship(foreign_keys=[base_model_id], lazy="raise")

    __mapper_args__ = {"polymorphic_identity": ModelKind.LOCAL.value, "polymorphic_load": "inline"}


class GlobalModelRound(IDMixin, TimestampMixin, Base):
    """Model history: the encoded global model (a TorchScript blob) after each aggregation.

    Round ``start`` holds the uploaded model, every aggregation adds the next round, so any
    round's global weights can be downloaded (the reference overwrote them)."""

    __tablename__ = "global_model_rounds"
    __table_args__ = (UniqueConstraint("model_id", "round"),)

    model_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("global_models.id", ondelete="CASCADE"), index=True
    )
    round: Mapped[int] = mapped_column(Integer)
    weights_digest: Mapped[str | None] = _digest()
    weights_format: Mapped[str | None] = mapped_column(String(20))
    weights_size: Mapped[int] = mapped_column(BigInteger, default=0)


class WeightsLayout(Base):
    """The tensor layout of a weights blob, by the blob's digest: ``{name: [dtype, shape]}``
    (``dtype`` as torch names it without ``torch.``, e.g. ``"float32"``). What an update is checked
    against without reading the global model (:mod:`flplatform.models.layouts`). Keyed by content,
    so a row is never stale and every row naming that digest (model, history, copies) shares it."""

    __tablename__ = "weights_layouts"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    layout: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: A TorchScript archive's storage plan ``{tensor name: zip entry}``
    #: (:mod:`flplatform.models.archive_weights`), when one was found at upload or carried.
    storage_plan: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)


@event.listens_for(Model, "before_insert", propagate=True)
def _fill_tenant(_mapper: object, connection: Any, model: Model) -> None:
    """Copy the tenant from where it is decided: a local update belongs to its base model's
    organisation, anything else to its owner's (one primary-key look-up per insert). A tenant
    given to the constructor, ``None`` included, is kept: the upload path passes its global
    model's, already loaded."""
    if model.organization_id is not None or "organization_id" in vars(model):
        return
    if isinstance(model, LocalModel):
        source = select(Model.organization_id).where(Model.id == model.base_model_id)
    else:
        source = select(User.organization_id).where(User.id == model.owner_id)
    model.organization_id = connection.execute(source).scalar()
