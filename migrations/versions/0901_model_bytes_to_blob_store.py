"""Model bytes out of the database: every blob column becomes the SHA-256 digest of a blob in
the blob store (flplatform.blobs, docs/storage.md), and the bytes already stored move there.

The store is the one the settings name for the migrated database (``FLP_BLOB_URL``, or
``FLP_BLOB_DIR``, by default ``blobs/`` next to the SQLite file). Rows are read one at a time, so
the migration holds one blob in memory, not a table. The blobs are written before the columns
are dropped; a migration that fails after writing some leaves only unreferenced blobs, which the
sweep removes. The downgrade copies the bytes back from the store.

Revision ID: 0901
Revises: 0902
Create Date: 2026-12-04 16:50:00
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from flplatform.blobs import BlobStore

revision: str = "0901"
down_revision: str | Sequence[str] | None = "0902"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> [(blob column, digest column)]
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "models": [("weights", "weights_digest")],
    "global_models": [("preprocessing", "preprocessing_digest")],
    "swag_models": [("swag_first_moment", "swag_first_digest"), ("swag_second_moment", "swag_second_digest")],
    "global_model_rounds": [("weights", "weights_digest")],
    "trainings": [("aggregator_state", "aggregator_state_digest")],
    "swag_statistics": [("first_moment", "first_moment_digest"), ("second_moment", "second_moment_digest")],
}


def _store() -> BlobStore:
    from flplatform.blobs import open_store
    from flplatform.settings import Settings

    url = op.get_bind().engine.url.render_as_string(hide_password=False)
    return open_store(Settings(), url)


def _table(name: str, *columns: str) -> sa.Table:
    return sa.table(name, sa.column("id"), *(sa.column(c) for c in columns))


def upgrade() -> None:
    bind, store = op.get_bind(), _store()
    for name, pairs in COLUMNS.items():
        for _blob, digest in pairs:
            op.add_column(name, sa.Column(digest, sa.String(64), nullable=True))
        for blob, digest in pairs:
            table = _table(name, blob, digest)
            ids = bind.execute(sa.select(table.c.id).where(table.c[blob].isnot(None))).scalars().all()
            for row_id in ids:  # one blob in memory at a time
                data = bind.execute(sa.select(table.c[blob]).where(table.c.id == row_id)).scalar_one()
                info = store.put_sync(bytes(data))
                bind.execute(sa.update(table).where(table.c.id == row_id).values({digest: info.digest}))
        for blob, _digest in pairs:
            # Plain ALTER TABLE … DROP COLUMN (SQLite ≥ 3.35), not batch mode: batch mode copies and
            # drops the table, and dropping `models` with foreign keys on would cascade to its children.
            op.drop_column(name, blob)


def downgrade() -> None:
    import asyncio

    bind, store = op.get_bind(), _store()
    for name, pairs in COLUMNS.items():
        for blob, _digest in pairs:
            op.add_column(name, sa.Column(blob, sa.LargeBinary(), nullable=True))
        for blob, digest in pairs:
            table = _table(name, blob, digest)
            rows = bind.execute(
                sa.select(table.c.id, table.c[digest]).where(table.c[digest].isnot(None))
            ).all()
            for row_id, value in rows:
                # The migration runs inside the environment's event loop: read in a thread of its own.
                with ThreadPoolExecutor(1) as pool:
                    data = pool.submit(asyncio.run, store.read(value)).result()
                bind.execute(sa.update(table).where(table.c.id == row_id).values({blob: data}))
        for _blob, digest in pairs:
            op.drop_column(name, digest)
