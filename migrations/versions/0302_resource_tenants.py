"""tenant column (organization_id) on models, trainings and broker topics

Revision ID: 0302
Revises: 0301, 0102, 0201
Create Date: 2026-11-23 12:30:00

Backfills existing rows from their owners (models: the owner's organisation, local updates: their
base model's; trainings: their global model's; topics: the owner's, response topics: their source
topic's), so rows created before organisations existed stay in the organisation-less space.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0302"
# trainings.py columns come from 0101/0102, broker_topics from 0201. They were ``depends_on``
# until 0801 made the revisions one line: as down revisions they order the same, and Alembic
# counts a revision that only others depend on as a head of its own (issue 15 item 6).
down_revision: str | Sequence[str] | None = ("0301", "0102", "0201")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("models", "trainings", "broker_topics")

BACKFILL = (
    "UPDATE models SET organization_id = (SELECT users.organization_id FROM users WHERE users.id = models.owner_id)",
    "UPDATE models SET organization_id = (SELECT base.organization_id FROM models AS base, local_models "
    "WHERE local_models.id = models.id AND base.id = local_models.base_model_id) "
    "WHERE models.id IN (SELECT id FROM local_models)",
    "UPDATE trainings SET organization_id = (SELECT models.organization_id FROM models WHERE models.id = trainings.model_id)",
    "UPDATE broker_topics SET organization_id = (SELECT users.organization_id FROM users "
    "WHERE users.id = broker_topics.owner_id)",
    "UPDATE broker_topics SET organization_id = (SELECT source.organization_id FROM broker_topics AS source, "
    "broker_response_topics WHERE broker_response_topics.id = broker_topics.id "
    "AND source.id = broker_response_topics.is_response_for_id) "
    "WHERE broker_topics.id IN (SELECT id FROM broker_response_topics)",
)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table in TABLES:
        constraint = f"fk_{table}_organization_id_collections"
        if sqlite:
            # Not batch mode: recreating these tables would DROP them, and with foreign keys on,
            # SQLite would run the ON DELETE CASCADE of every table pointing at them (metrics,
            # local models, messages…). A nullable column with a named REFERENCES clause is
            # added in place. No ON DELETE action (SQLite's reflection could not compare it):
            # an organisation is deleted only without users, and its remaining topics are
            # deleted first by the service (``organizations.service.delete_collection``).
            op.execute(
                f"ALTER TABLE {table} ADD COLUMN organization_id CHAR(32) CONSTRAINT {constraint} "
                "REFERENCES collections (id)"
            )
        else:
            op.add_column(table, sa.Column("organization_id", sa.Uuid(), nullable=True))
            op.create_foreign_key(constraint, table, "collections", ["organization_id"], ["id"])
        op.create_index(f"ix_{table}_organization_id", table, ["organization_id"], unique=False)
    for statement in BACKFILL:
        op.execute(statement)


def downgrade() -> None:
    # On SQLite this recreates the tables; run downgrades there with foreign keys off.
    for table in reversed(TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_organization_id")
            batch_op.drop_constraint(f"fk_{table}_organization_id_collections", type_="foreignkey")
            batch_op.drop_column("organization_id")
