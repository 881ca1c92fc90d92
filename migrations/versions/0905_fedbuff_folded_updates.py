"""Asynchronous trainings (FedBuff): ``local_models.folded_into``, the global version an update
was folded into; null while it waits in the buffer (and for synchronous trainings' updates).

Revision ID: 0905
Revises: 0901
Create Date: 2026-12-04 19:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0905"
down_revision: str | Sequence[str] | None = "0901"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("local_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("folded_into", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("local_models", schema=None) as batch_op:
        batch_op.drop_column("folded_into")
