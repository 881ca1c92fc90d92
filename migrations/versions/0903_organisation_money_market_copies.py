"""Organisation money, the market and model copies (issue 17).

* ``ledger_accounts.organization_id``: an organisation's own accounts (``org:<id>:…``); the CHECK
  now says a holder account belongs to exactly one user or one organisation.
* ``ledger_holds.organization_id``, ``billing_operations.organization_id`` /
  ``model_organization_id``: the organisation that paid (the member stays ``payer_id``) and the
  one credited by a market sale.
* ``billing_bills``: addressed to a user or an organisation.
* ``billing_spending_limits``: per-member monthly caps set by organisation admins.
* ``billing_model_pricing``: copies allowed at a price, and when the model was published.
* ``model_copies``: where a copied model came from and the round it holds.
* ``operation_kind`` loses ``data_source_purchase``: there is no data-source entity (no row can
  hold the value: no route ever produced it).

Revision ID: 0903
Revises: 0905 (the lead gave 0901; main meanwhile gained 0905 on it)
Create Date: 2026-12-04 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import flplatform.orm.base

revision: str = "0903"
down_revision: str | Sequence[str] | None = "0905"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SYSTEM = "'exchange', 'external_payments', 'market_payouts', 'promotions', 'revenue'"
_OLD_HOLDER = (
    f"(kind IN ({_SYSTEM}) AND owner_id IS NULL AND balance IS NULL) OR "
    f"(kind NOT IN ({_SYSTEM}) AND owner_id IS NOT NULL AND balance IS NOT NULL AND balance >= 0)"
)
_NEW_HOLDER = (
    f"(kind IN ({_SYSTEM}) AND owner_id IS NULL AND organization_id IS NULL "
    f"AND balance IS NULL) OR (kind NOT IN ({_SYSTEM}) AND "
    "((owner_id IS NOT NULL AND organization_id IS NULL) OR "
    "(owner_id IS NULL AND organization_id IS NOT NULL)) AND balance IS NOT NULL AND balance >= 0)"
)
_KINDS = [
    "training",
    "inference",
    "inference_api",
    "inference_market",
    "model_copy",
    "model_copy_update",
    "top_up",
    "pay_bill",
    "coupon_redemption",
    "conversion",
    "refund",
    "payout",
]
_OLD_KINDS = [*_KINDS[:4], "data_source_purchase", *_KINDS[4:]]


def _kind_check(kinds: list[str]) -> str:
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def _sqlite_foreign_keys_off() -> None:
    """SQLite changes a CHECK by copying the table, and dropping the old copy of a table other
    rows reference fails while foreign keys are enforced. The pragma is ignored inside a
    transaction, so the one this migration run has open (earlier revisions' rows) is committed
    first; the connection is closed after the run, which restores the enforcement of the app's."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        raw = bind.connection.dbapi_connection  # aiosqlite's adapter around an aiosqlite connection
        if getattr(getattr(raw, "_connection", raw), "in_transaction", False):
            bind.exec_driver_sql("COMMIT")
        bind.exec_driver_sql("PRAGMA foreign_keys=OFF")


def upgrade() -> None:
    _sqlite_foreign_keys_off()
    with op.batch_alter_table("ledger_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("organization_id", sa.Uuid(), nullable=True))
        batch_op.drop_constraint(batch_op.f("ck_ledger_accounts_owner_and_balance"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_ledger_accounts_holder_and_balance"), _NEW_HOLDER)
        batch_op.create_foreign_key(
            batch_op.f("fk_ledger_accounts_organization_id_collections"),
            "collections",
            ["organization_id"],
            ["id"],
            ondelete="RESTRICT",
        )
        batch_op.create_unique_constraint(
            batch_op.f("uq_ledger_accounts_organization_id_kind_currency"),
            ["organization_id", "kind", "currency"],
        )
        batch_op.create_index(
            batch_op.f("ix_ledger_accounts_organization_id"), ["organization_id"], unique=False
        )

    with op.batch_alter_table("ledger_holds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("organization_id", sa.Uuid(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_ledger_holds_organization_id"), ["organization_id"], unique=False
        )

    with op.batch_alter_table("billing_operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("organization_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("model_organization_id", sa.Uuid(), nullable=True))
        batch_op.drop_constraint(batch_op.f("ck_billing_operations_operation_kind"), type_="check")
        batch_op.create_check_constraint(
            batch_op.f("ck_billing_operations_operation_kind"), _kind_check(_KINDS)
        )
        batch_op.create_index(
            "ix_billing_operations_org_payer_created",
            ["organization_id", "payer_id", "created_at"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_billing_operations_model_organization_id"), ["model_organization_id"], unique=False
        )
        batch_op.alter_column(
            "kind", existing_type=sa.String(length=20), type_=sa.String(length=17), existing_nullable=False
        )

    with op.batch_alter_table("billing_bills", schema=None) as batch_op:
        batch_op.add_column(sa.Column("organization_id", sa.Uuid(), nullable=True))
        batch_op.alter_column("user_id", existing_type=sa.Uuid(), nullable=True)
        batch_op.create_foreign_key(
            batch_op.f("fk_billing_bills_organization_id_collections"),
            "collections",
            ["organization_id"],
            ["id"],
            ondelete="RESTRICT",
        )
        batch_op.create_check_constraint(
            batch_op.f("ck_billing_bills_one_addressee"), "(user_id IS NULL) <> (organization_id IS NULL)"
        )
        batch_op.create_index(
            batch_op.f("ix_billing_bills_organization_id"), ["organization_id"], unique=False
        )

    with op.batch_alter_table("billing_model_pricing", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("copy_allowed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("copy_price", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("published_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_check_constraint(
            batch_op.f("ck_billing_model_pricing_copy_price_nonnegative"), "copy_price >= 0"
        )
    with op.batch_alter_table("billing_model_pricing", schema=None) as batch_op:
        batch_op.alter_column("copy_allowed", server_default=None)
        batch_op.alter_column("copy_price", server_default=None)

    op.create_table(
        "billing_spending_limits",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column(
            "currency",
            sa.Enum("USD", "TOKEN", "COUPON", name="currency", native_enum=False, create_constraint=True),
            nullable=False,
        ),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("updated_by_id", sa.Uuid(), nullable=True),
        sa.Column("updated_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount >= 0", name=op.f("ck_billing_spending_limits_amount_nonnegative")),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["collections.id"],
            name=op.f("fk_billing_spending_limits_organization_id_collections"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_billing_spending_limits_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "organization_id", "user_id", "currency", name=op.f("pk_billing_spending_limits")
        ),
    )
    op.create_table(
        "model_copies",
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("source_model_id", sa.Uuid(), nullable=False),
        sa.Column("source_round", sa.Integer(), nullable=False),
        sa.Column("created_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", flplatform.orm.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_model_copies_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_model_copies")),
    )
    with op.batch_alter_table("model_copies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_copies_source_model_id"), ["source_model_id"], unique=False
        )


def downgrade() -> None:
    _sqlite_foreign_keys_off()
    with op.batch_alter_table("model_copies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_copies_source_model_id"))
    op.drop_table("model_copies")
    op.drop_table("billing_spending_limits")
    with op.batch_alter_table("billing_model_pricing", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_billing_model_pricing_copy_price_nonnegative"), type_="check")
        batch_op.drop_column("published_at")
        batch_op.drop_column("copy_price")
        batch_op.drop_column("copy_allowed")
    op.execute("DELETE FROM billing_bills WHERE organization_id IS NOT NULL")
    with op.batch_alter_table("billing_bills", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_billing_bills_organization_id"))
        batch_op.drop_constraint(batch_op.f("ck_billing_bills_one_addressee"), type_="check")
        batch_op.drop_constraint(
            batch_op.f("fk_billing_bills_organization_id_collections"), type_="foreignkey"
        )
        batch_op.alter_column("user_id", existing_type=sa.Uuid(), nullable=False)
        batch_op.drop_column("organization_id")
    with op.batch_alter_table("billing_operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_billing_operations_model_organization_id"))
        batch_op.drop_index("ix_billing_operations_org_payer_created")
        batch_op.drop_constraint(batch_op.f("ck_billing_operations_operation_kind"), type_="check")
        batch_op.alter_column("kind", existing_type=sa.String(length=17), type_=sa.String(length=20))
        batch_op.create_check_constraint(
            batch_op.f("ck_billing_operations_operation_kind"), _kind_check(_OLD_KINDS)
        )
        batch_op.drop_column("model_organization_id")
        batch_op.drop_column("organization_id")
    with op.batch_alter_table("ledger_holds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_holds_organization_id"))
        batch_op.drop_column("organization_id")
    # Organisation accounts cannot exist under the old CHECK: a downgrade with organisation money
    # in the ledger fails here rather than losing it.
    with op.batch_alter_table("ledger_accounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_accounts_organization_id"))
        batch_op.drop_constraint(
            batch_op.f("uq_ledger_accounts_organization_id_kind_currency"), type_="unique"
        )
        batch_op.drop_constraint(
            batch_op.f("fk_ledger_accounts_organization_id_collections"), type_="foreignkey"
        )
        batch_op.drop_constraint(batch_op.f("ck_ledger_accounts_holder_and_balance"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_ledger_accounts_owner_and_balance"), _OLD_HOLDER)
        batch_op.drop_column("organization_id")
