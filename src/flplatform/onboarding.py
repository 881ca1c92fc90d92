"""The route to a first user, said where a newcomer looks: the start-up log, the ``/docs`` page and
the 401 of a failed login while no user exists.

We print the exact command rather than invent an administrator with a generated password: a
deployment then never holds a credential nobody chose, and ``FLP_ADMIN_*`` stays the way to
create one unattended (containers, CI).
"""

from __future__ import annotations

from sqlalchemy import exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.orm import User

CREATE_SUPERUSER_COMMAND = "flplatform createuser --superuser --username admin --email admin@example.org"

FIRST_USER_HINT = (
    f"No user exists yet. Create the first administrator with `{CREATE_SUPERUSER_COMMAND}` "
    "(it prompts for the password), or set FLP_ADMIN_USERNAME and FLP_ADMIN_PASSWORD and restart the server."
)


def first_user_banner(database: str) -> str:
    """The block logged at start-up while the database has no active superuser."""
    rule = "=" * 78
    return "\n".join(
        [
            rule,
            f"No active superuser in {database}. Create the first administrator:",
            "",
            f"    {CREATE_SUPERUSER_COMMAND}",
            "",
            "(same FLP_DATABASE_URL as this server; it prompts for the password), or set",
            "FLP_ADMIN_USERNAME, FLP_ADMIN_PASSWORD (and FLP_ADMIN_EMAIL) and restart.",
            "Then log in with the Authorize button on /docs.",
            rule,
        ]
    )


async def has_active_superuser(session: AsyncSession) -> bool:
    query = select(exists().where(User.is_superuser.is_(True), User.is_active.is_(True)))
    return bool((await session.execute(query)).scalar())


async def has_users(session: AsyncSession) -> bool:
    return bool((await session.execute(select(exists().select_from(User)))).scalar())
