"""Federations of many clients (issue 18, items 1-3): the collections a training draws its
participants from, the recorded client selection of every round (and the training's current
one, ``trainings.selection_round``; null on existing trainings, which keep waiting for every
participant), and the clients' last HTTP heartbeats.

Revision ID: 0904
Revises: 0903
Create Date: 2026-12-04 19:01:58
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import flplatform.orm.base

revision: str = "0904"
down_revision: str | Sequence[str] | None = "0903"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "client_heartbeats",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("last_seen_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_client_heartbeats_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_client_heartbeats")),
    )
    op.create_table(
        "training_collections",
        sa.Column("training_id", sa.Uuid(), nullable=False),
        sa.Column("collection_id", sa.Uuid(), nullable=False),
        sa.Column("added_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["collection_id"],
            ["collections.id"],
            name=op.f("fk_training_collections_collection_id_collections"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["training_id"],
            ["trainings.id"],
            name=op.f("fk_training_collections_training_id_trainings"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("training_id", "collection_id", name=op.f("pk_training_collections")),
    )
    with op.batch_alter_table("training_collections", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_training_collections_collection_id"), ["collection_id"], unique=False
        )

    op.create_table(
        "training_round_selections",
        sa.Column("training_id", sa.Uuid(), nullable=False),
        sa.Column("round", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("selected_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("dropped_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("drop_reason", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["training_id"],
            ["trainings.id"],
            name=op.f("fk_training_round_selections_training_id_trainings"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_training_round_selections_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("training_id", "round", "user_id", name=op.f("pk_training_round_selections")),
    )
    with op.batch_alter_table("training_round_selections", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_round_selections_user_id"), ["user_id"], unique=False)

    with op.batch_alter_table("trainings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("selection_round", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trainings", schema=None) as batch_op:
        batch_op.drop_column("selection_round")

    with op.batch_alter_table("training_round_selections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_round_selections_user_id"))

    op.drop_table("training_round_selections")
    with op.batch_alter_table("training_collections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_collections_collection_id"))

    op.drop_table("training_collections")
    op.drop_table("client_heartbeats")
