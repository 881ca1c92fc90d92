"""Weights layouts gain the storage plan of a TorchScript archive (which zip entry holds which
tensor), found at upload from the digests the model sandbox reports, so no server process decodes
a global model to learn it (issue 21). Nullable: rows without one learn it as before.

Revision ID: 0912
Revises: 0909
Create Date: 2026-12-04 22:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0912"
down_revision: str | Sequence[str] | None = "0909"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("weights_layouts") as batch:
        batch.add_column(sa.Column("storage_plan", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("weights_layouts") as batch:
        batch.drop_column("storage_plan")
