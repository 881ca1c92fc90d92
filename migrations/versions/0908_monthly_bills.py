"""Automatic monthly bills and due dates (issue 17, item 4).

* ``billing_bills.due_at``: an open bill past it stops its addressee's new paid work.
* ``billing_bills.monthly`` / ``lines``: a bill the month-end job issued, with its invoice lines;
  a unique index on (organisation, period) among monthly bills keeps a re-run from issuing a
  second one.
* ``bill_status`` gains ``settled``: a monthly bill of usage already paid from the balance.

Revision ID: 0908
Revises: 0904 (the lead gave 0903; main meanwhile gained 0904 on it)
Create Date: 2026-12-04 20:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import flplatform.orm.base

revision: str = "0908"
down_revision: str | Sequence[str] | None = "0904"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _sqlite_foreign_keys_off() -> None:
    """As in 0903: SQLite changes a CHECK by copying the table, which needs foreign keys off
    (ignored inside a transaction, so the open one is committed first)."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        raw = bind.connection.dbapi_connection
        if getattr(getattr(raw, "_connection", raw), "in_transaction", False):
            bind.exec_driver_sql("COMMIT")
        bind.exec_driver_sql("PRAGMA foreign_keys=OFF")


def upgrade() -> None:
    _sqlite_foreign_keys_off()
    with op.batch_alter_table("billing_bills", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("due_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("monthly", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("lines", sa.JSON(), nullable=True))
        batch_op.drop_constraint(batch_op.f("ck_billing_bills_bill_status"), type_="check")
        batch_op.alter_column(
            "status", existing_type=sa.String(length=4), type_=sa.String(length=7), existing_nullable=False
        )
        batch_op.create_check_constraint(
            batch_op.f("ck_billing_bills_bill_status"), "status IN ('open', 'paid', 'settled')"
        )
        batch_op.create_index(
            "uq_billing_bills_monthly",
            ["organization_id", "period"],
            unique=True,
            sqlite_where=sa.text("monthly"),
            postgresql_where=sa.text("monthly"),
        )


def downgrade() -> None:
    _sqlite_foreign_keys_off()
    op.execute("DELETE FROM billing_bills WHERE status = 'settled'")
    with op.batch_alter_table("billing_bills", schema=None) as batch_op:
        batch_op.drop_index("uq_billing_bills_monthly")
        batch_op.drop_constraint(batch_op.f("ck_billing_bills_bill_status"), type_="check")
        batch_op.alter_column(
            "status", existing_type=sa.String(length=7), type_=sa.String(length=4), existing_nullable=False
        )
        batch_op.create_check_constraint(
            batch_op.f("ck_billing_bills_bill_status"), "status IN ('open', 'paid')"
        )
        batch_op.drop_column("lines")
        batch_op.drop_column("monthly")
        batch_op.drop_column("due_at")
