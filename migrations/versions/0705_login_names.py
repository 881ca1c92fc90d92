"""Identity: ``login_names``, every username and email under one normalised unique key, so a
username can never equal another user's email (the victim's email login answered 500 with
``MultipleResultsFound``).

Backfill, oldest user first: emails claim their keys first (an email is who a person is; a
username that spells somebody's address is the suspect one), then usernames. A username whose
key is already another user's gets a free name (``<name>-<n>``); an email whose key another
user's email already holds (they differed only in Unicode form, emails are stored lower-case) is
cleared. Every repair is written to ``audit_log`` (action ``identity.login_name_repaired``) with
the old value, so nothing is lost and an administrator can tell the users.

Revision ID: 0705
Revises: 0704
Create Date: 2026-12-03 18:50:00
"""

from __future__ import annotations

import datetime as dt
import socket
import unicodedata
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0705"
down_revision: str | Sequence[str] | None = "0704"
branch_labels: str | Sequence[str] | None = None
# audit_log (the repairs are recorded there) comes from the billing branch.
depends_on: str | Sequence[str] | None = "0401"

USERNAME_MAX = 150


def _key(name: str) -> str:
    # Same as flplatform.auth.login_names.login_key (kept here: migrations never import app code).
    return unicodedata.normalize("NFKC", name).casefold()


def upgrade() -> None:
    login_names = op.create_table(
        "login_names",
        sa.Column("name", sa.String(length=1024), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_login_names_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_login_names")),
    )
    with op.batch_alter_table("login_names", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_login_names_user_id"), ["user_id"], unique=False)

    bind = op.get_bind()
    users = sa.table(
        "users",
        sa.column("id", sa.Uuid()),
        sa.column("username", sa.String()),
        sa.column("email", sa.String()),
        sa.column("created_at", sa.DateTime()),
    )
    audit = sa.table(
        "audit_log",
        sa.column("id", sa.Uuid()),
        sa.column("timestamp", sa.DateTime(timezone=True)),
        sa.column("level", sa.String()),
        sa.column("action", sa.String()),
        sa.column("module", sa.String()),
        sa.column("function", sa.String()),
        sa.column("message", sa.Text()),
        sa.column("host", sa.String()),
        sa.column("subject_user_id", sa.Uuid()),
    )
    rows = bind.execute(
        sa.select(users.c.id, users.c.username, users.c.email).order_by(users.c.created_at, users.c.id)
    ).all()
    owner: dict[str, uuid.UUID] = {}
    repairs: list[tuple[uuid.UUID, str]] = []

    def note(user_id: uuid.UUID, message: str) -> None:
        repairs.append((user_id, message))

    for user_id, _username, email in rows:  # emails first
        if not email:
            continue
        key = _key(email)
        if owner.setdefault(key, user_id) != user_id:
            bind.execute(users.update().where(users.c.id == user_id).values(email=None))
            note(user_id, f"email {email!r} cleared: another user's email or username is the same login name")
    for user_id, username, _email in rows:
        key = _key(username)
        if owner.setdefault(key, user_id) == user_id:
            continue
        for n in range(2, 10_000):
            suffix = f"-{n}"
            candidate = username[: USERNAME_MAX - len(suffix)] + suffix
            if _key(candidate) not in owner:
                break
        owner[_key(candidate)] = user_id
        bind.execute(users.update().where(users.c.id == user_id).values(username=candidate))
        note(
            user_id,
            f"username {username!r} renamed to {candidate!r}: another user's email or username "
            "is the same login name",
        )
    if owner:
        bind.execute(login_names.insert(), [{"name": key, "user_id": uid} for key, uid in owner.items()])
    now = dt.datetime.now(dt.UTC)
    host = socket.gethostname()[:255]
    for user_id, message in repairs:
        bind.execute(
            audit.insert().values(
                id=uuid.uuid4(),
                timestamp=now,
                level="WARNING",
                action="identity.login_name_repaired",
                module="migrations.0705",
                function="upgrade",
                message=message,
                host=host,
                subject_user_id=user_id,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("login_names", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_login_names_user_id"))
    op.drop_table("login_names")
