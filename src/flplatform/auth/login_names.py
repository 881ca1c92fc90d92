"""The one place where login names are claimed, checked and looked up.

A user logs in with their username or their email. Both live in ``login_names`` under one
normalised key (NFKC, then case-folded: how logins compare), whose unique primary key the
database enforces under any concurrency: a username can never equal another user's email, an
email never another user's username, and two names never differ in case only. A user's own
username may equal their own email (one row). Login look-ups go through the same key, so they
are case-insensitive and find at most one user.
"""

from __future__ import annotations

import unicodedata
import uuid

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import Conflict
from flplatform.orm import LoginName, User


def login_key(name: str) -> str:
    """How two login names compare: compatibility-normalised (so ``ｂｏｂ`` is ``bob``), case-folded."""
    return unicodedata.normalize("NFKC", name).casefold()


def _wanted(username: str, email: str | None) -> dict[str, str]:
    """Key → which field claims it (the username wins the label when both are the same)."""
    keys = {}
    if email:
        keys[login_key(email)] = "email"
    keys[login_key(username)] = "username"
    return keys


async def check_available(
    session: AsyncSession, *, username: str | None, email: str | None, exclude: uuid.UUID | None = None
) -> None:
    """409 in the error shape when a name is some other user's username or email."""
    claims = {}
    if email:
        claims[login_key(email)] = ("email", email)
    if username:
        claims[login_key(username)] = ("username", username)
    if not claims:
        return
    stmt = select(LoginName.name).where(LoginName.name.in_(list(claims)))
    if exclude is not None:
        stmt = stmt.where(LoginName.user_id != exclude)
    with session.no_autoflush:  # the user being saved may be pending: flushed in save_user only
        taken = set((await session.execute(stmt)).scalars())
    for key, (field, value) in claims.items():
        if key in taken:
            if field == "username":
                raise Conflict(
                    f"A user with the login name {value!r} (a username or an email) already exists.",
                    code="username_taken",
                )
            raise Conflict(f"A user with email {value!r} already exists.", code="email_taken")


async def save_user(session: AsyncSession, user: User) -> None:
    """Flush ``user`` (new or changed) and make its login names match its username and email,
    in a savepoint: a name claimed concurrently by another transaction (the unique key, or the
    ``users`` unique columns) is a 409, never a 500."""
    username, email, user_id = user.username, user.email, user.id
    await check_available(session, username=username, email=email, exclude=user_id)
    try:
        async with session.begin_nested():
            await session.flush()
            wanted = _wanted(user.username, user.email)
            have = set(
                (await session.execute(select(LoginName.name).where(LoginName.user_id == user.id))).scalars()
            )
            stale = have - set(wanted)
            if stale:
                await session.execute(
                    delete(LoginName).where(LoginName.user_id == user.id, LoginName.name.in_(stale))
                )
            session.add_all(LoginName(name=key, user_id=user.id) for key in wanted if key not in have)
            await session.flush()
    except IntegrityError:
        # Lost a race: say which name, as the check would have. In a session of its own: SQLite
        # (pysqlite) savepoints do not survive a failed flush, so this transaction is done for.
        async with AsyncSession(session.bind) as fresh:
            await check_available(fresh, username=username, email=email, exclude=user_id)
        raise Conflict(
            "That username or email was just taken by another user.", code="login_name_taken"
        ) from None


async def user_for_login(session: AsyncSession, login: str) -> User | None:
    """The user whose username or email is ``login`` (case-insensitively); never more than one."""
    stmt = (
        select(User).join(LoginName, LoginName.user_id == User.id).where(LoginName.name == login_key(login))
    )
    return (await session.execute(stmt)).scalar_one_or_none()
