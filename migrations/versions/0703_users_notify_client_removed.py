"""Users: ``notify_client_removed``, whether CLIENT_REMOVED is sent to the user's
``message_endpoint`` (off by default: clients written for the reference platform answer
notification types they do not know with 400, so they opt in only if they handle it).

Revision ID: 0703
Revises: 0602
Create Date: 2026-12-03 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0703"
down_revision: str | Sequence[str] | None = "0602"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("notify_client_removed", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("notify_client_removed")
