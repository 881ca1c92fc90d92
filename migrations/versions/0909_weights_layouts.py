"""Weights layouts: the tensor layout (names, dtypes, shapes) of each global weights blob, by its
digest, so an update is checked without reading the global model (issue 21). Existing blobs get
theirs computed from the weights on first use (no sandbox runs at migration time).

Revision ID: 0909
Revises: 0908
Create Date: 2026-12-04 20:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0909"
down_revision: str | Sequence[str] | None = "0908"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "weights_layouts",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("layout", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_weights_layouts")),
    )


def downgrade() -> None:
    op.drop_table("weights_layouts")
