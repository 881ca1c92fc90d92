"""One migration line: merge the domain branches into a single head (issue 15 item 6).

The domains used to add revisions on their own branches from the foundation (``0001``) and
declare their cross-branch needs as ``depends_on``; Alembic counts a revision that others only
depend on as a head, so the script directory had five heads (0102, 0201, 0302, 0401, 0705) and
every upgrade needed ``heads``. 0302 and 0601 now name those needs as down revisions (the same
order, so the same history for every database), which leaves two heads, 0302 and 0705 — exactly
what ``alembic_version`` holds in a database migrated to the five old heads, because Alembic left
out the revisions another one depended on. This revision merges the two and changes no schema.

Merging the five old heads directly does not work: Alembic's merge step then deletes 0102 from
``alembic_version``, where it never was (``KeyError: '0102'`` in ``HeadMaintainer``).

From here on there is one line: a new revision's ``down_revision`` is the current head
(``alembic heads`` shows it; ``tests/test_migration_line.py`` fails otherwise).

Revision ID: 0801
Revises: 0302, 0705
Create Date: 2026-12-03 21:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0801"
down_revision: str | Sequence[str] | None = ("0302", "0705")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
