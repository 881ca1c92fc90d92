"""Training events: the recent, numbered history of each training's events (round started,
update received, aggregation finished, ...) that ``GET /api/trainings/{id}/events/`` streams and
replays from ``Last-Event-ID`` (issue 16 item 2), and the per-training counter that numbers them.

Revision ID: 0902
Revises: 0801
Create Date: 2026-12-04 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import flplatform.orm.base

revision: str = "0902"
down_revision: str | Sequence[str] | None = "0801"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "training_event_heads",
        sa.Column("training_id", sa.Uuid(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["training_id"],
            ["trainings.id"],
            name=op.f("fk_training_event_heads_training_id_trainings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("training_id", name=op.f("pk_training_event_heads")),
    )
    op.create_table(
        "training_events",
        sa.Column("training_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["training_id"],
            ["trainings.id"],
            name=op.f("fk_training_events_training_id_trainings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("training_id", "seq", name=op.f("pk_training_events")),
    )


def downgrade() -> None:
    op.drop_table("training_events")
    op.drop_table("training_event_heads")
