"""Users and their API tokens. Flushes, never commits.

Users reach the update and delete functions already authorised (``users.dependencies``); the
functions taking a ``Requester`` check what depends on the request body (who may create this
user, which of their own fields a member may change) and filter lists with
``permissions.readable``.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform import audit
from flplatform.auth import login_names
from flplatform.auth.credentials import (
    decrypt,
    encrypt,
    hash_password,
    new_api_token,
    new_user_token,
    token_digest,
)
from flplatform.errors import Conflict, Forbidden, NotFound, Unprocessable
from flplatform.kit.pagination import paginate
from flplatform.orm import ApiToken, User
from flplatform.orm.base import utcnow
from flplatform.orm.organizations import Collection, CollectionKind
from flplatform.permissions import Requester, can_create, readable, refused_self_edits
from flplatform.users.schemas import TokenCreate, UserCreate, UserUpdate

log = logging.getLogger(__name__)

PRIMARY_TOKEN_NAME = "primary"
_PRIVILEGED_FIELDS = ("is_staff", "is_superuser", "is_active")


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound(f"User {user_id} not found.")
    return user


async def list_users(requester: Requester, *, limit: int, offset: int) -> tuple[list[User], int]:
    """A page of the users the caller may see, in creation order, and their total."""
    stmt = select(User).where(readable(requester, User))
    return await paginate(
        requester.session, stmt, order_by=(User.created_at, User.id), limit=limit, offset=offset
    )


async def authorize_new_user(requester: Requester, data: UserCreate) -> UserCreate:
    """``data`` as the caller may create it, else 403 (404 for an unknown organisation).

    Anonymous callers (self-registration) stay outside organisations; organisation admins create
    users in their own organisation (the default ``organization_id``); superusers anywhere.
    """
    caller = requester.user
    if caller is None and data.organization_id is not None:
        raise Forbidden("Join an organisation through an invitation link.", code="invitation_required")
    if caller is not None and not caller.is_superuser:
        if data.organization_id is None:
            data = data.model_copy(update={"organization_id": caller.organization_id})
        if not await can_create(requester, User(organization_id=data.organization_id)):
            raise Forbidden("Only superusers and organisation admins may create users.")
    if data.organization_id is not None:
        if data.is_superuser:
            raise Unprocessable("Superusers belong to no organisation.", code="superuser_has_no_organization")
        organization = await requester.session.get(Collection, data.organization_id)
        if organization is None or organization.kind != CollectionKind.ORGANIZATION:
            raise NotFound(f"Organization {data.organization_id} not found.")
    return data


async def create_user(
    session: AsyncSession, data: UserCreate, *, created_by: User | None
) -> tuple[User, str]:
    """Create a user and their primary token; returns the user and the token in clear."""
    if (data.is_staff or data.is_superuser) and not (created_by and created_by.is_superuser):
        raise Forbidden("Only superusers may create staff or superusers.")
    email = str(data.email).lower() if data.email else None
    await login_names.check_available(session, username=data.username, email=email)
    fields = data.model_dump(exclude={"password", "email", "message_endpoint"})
    user = User(
        **fields,
        email=email,
        message_endpoint=str(data.message_endpoint) if data.message_endpoint else None,
        password_hash=await hash_password(data.password),
    )
    session.add(user)
    await login_names.save_user(session, user)
    token = await issue_primary_token(session, user)
    return user, token


async def update_user_as(requester: Requester, user: User, data: UserUpdate) -> User:
    """``update_user`` by the caller, within their organisation's ``members_can_edit_*`` settings
    when they change themselves (403 naming the refused fields)."""
    refused = await refused_self_edits(requester, user, data.model_fields_set)
    if refused:
        raise Forbidden(
            f"Your organisation does not let members change their own {', '.join(refused)}.",
            code="setting_forbids",
        )
    return await update_user(requester.session, user, data, by=requester.authenticated_user)


async def update_user(session: AsyncSession, user: User, data: UserUpdate, *, by: User) -> User:
    changes = data.model_dump(exclude_unset=True)
    if not by.is_superuser and any(field in changes for field in _PRIVILEGED_FIELDS):
        raise Forbidden("Only superusers may change is_active, is_staff or is_superuser.")
    if by.id == user.id and changes.get("is_superuser") is False:
        raise Forbidden("Superusers cannot remove their own superuser flag.")
    if "email" in changes and changes["email"] is not None:
        changes["email"] = str(changes["email"]).lower()
    await login_names.check_available(
        session, username=changes.get("username"), email=changes.get("email"), exclude=user.id
    )
    if "password" in changes:
        password = changes.pop("password")
        if password is not None:
            user.password_hash = await hash_password(password)
    if "message_endpoint" in changes and changes["message_endpoint"] is not None:
        changes["message_endpoint"] = str(changes["message_endpoint"])
    for field in ("username", "notify_client_removed"):
        if field in changes and changes[field] is None:
            changes.pop(field)
    for field, value in changes.items():
        setattr(user, field, value)
    await login_names.save_user(session, user)
    return user


async def delete_user(session: AsyncSession, user: User, *, by: User) -> None:
    if by.id == user.id and user.is_superuser:
        raise Forbidden("Superusers cannot delete themselves.")
    from flplatform.billing.ledger import has_billing_history

    if await has_billing_history(session, user.id):
        raise Conflict(
            "This user has billing history (balances, holds or bills), which is never deleted; "
            "deactivate the user instead (is_active=false).",
            code="user_has_billing_history",
        )
    await session.delete(user)
    await session.flush()


def _token_row(
    user: User, token: str, *, name: str, is_primary: bool, expires_at: dt.datetime | None
) -> ApiToken:
    return ApiToken(
        user_id=user.id,
        name=name,
        digest=token_digest(token),
        prefix=token[:8],
        is_primary=is_primary,
        encrypted=encrypt(token) if is_primary else None,
        created_at=utcnow(),
        expires_at=expires_at,
    )


async def issue_primary_token(session: AsyncSession, user: User) -> str:
    """The DLR-style token: 40 hex chars, shown again to its owner, so kept encrypted at rest."""
    token = new_user_token()
    session.add(_token_row(user, token, name=PRIMARY_TOKEN_NAME, is_primary=True, expires_at=None))
    await session.flush()
    return token


async def rotate_primary_token(session: AsyncSession, user: User) -> str:
    now = utcnow()
    for row in await _active_tokens(session, user, primary=True):
        row.revoked_at = now
    await audit.record(
        session,
        "auth.token_rotated",
        f"primary token of {user.username} replaced",
        actor=user,
        subject_user_id=user.id,
    )
    return await issue_primary_token(session, user)


async def _active_tokens(
    session: AsyncSession, user: User, *, primary: bool | None = None
) -> Sequence[ApiToken]:
    stmt = select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
    if primary is not None:
        stmt = stmt.where(ApiToken.is_primary.is_(primary))
    return (await session.execute(stmt.order_by(ApiToken.created_at))).scalars().all()


async def primary_token(session: AsyncSession, user: User) -> str | None:
    rows = await _active_tokens(session, user, primary=True)
    if not rows or rows[-1].encrypted is None:
        return None
    return decrypt(rows[-1].encrypted)


async def create_api_token(session: AsyncSession, user: User, data: TokenCreate) -> tuple[ApiToken, str]:
    token = new_api_token()
    expires = utcnow() + dt.timedelta(days=data.expires_in_days) if data.expires_in_days else None
    row = _token_row(user, token, name=data.name, is_primary=False, expires_at=expires)
    session.add(row)
    await session.flush()
    await audit.record(
        session,
        "auth.token_created",
        f"API token {data.name!r} ({row.prefix}…) of {user.username}",
        actor=user,
        subject_user_id=user.id,
    )
    return row, token


async def create_access_token(session: AsyncSession, user: User, ttl_seconds: int) -> str:
    token = new_api_token()
    expires = utcnow() + dt.timedelta(seconds=ttl_seconds)
    session.add(_token_row(user, token, name="oauth2", is_primary=False, expires_at=expires))
    user.last_login_at = utcnow()
    await session.flush()
    return token


async def list_tokens(
    session: AsyncSession, user: User, *, limit: int, offset: int
) -> tuple[list[ApiToken], int]:
    """A page of the user's API tokens, newest first, and their total."""
    return await paginate(
        session,
        select(ApiToken).where(ApiToken.user_id == user.id),
        order_by=(ApiToken.created_at.desc(), ApiToken.id),
        limit=limit,
        offset=offset,
    )


async def revoke_token(session: AsyncSession, user: User, token_id: uuid.UUID) -> ApiToken:
    row = await session.get(ApiToken, token_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"Token {token_id} not found.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        await audit.record(
            session,
            "auth.token_revoked",
            f"API token {row.name!r} ({row.prefix}…) of {user.username}",
            actor=user,
            subject_user_id=user.id,
        )
    await session.flush()
    return row


async def ensure_admin(
    session: AsyncSession, *, username: str, email: str | None, password: str
) -> User | None:
    """First-start bootstrap from FLP_ADMIN_*: create the superuser if no user has that login name
    (in any case). A clash with another user's email, or another worker creating it at the same
    time, leaves things as they are (logged) instead of failing the start-up."""
    if await login_names.user_for_login(session, username) is not None:
        return None
    data = UserCreate(username=username, email=email, password=password, is_staff=True, is_superuser=True)
    bootstrap = User(username="<bootstrap>", is_superuser=True)
    try:
        user, _ = await create_user(session, data, created_by=bootstrap)
    except Conflict as exc:
        log.warning("FLP_ADMIN_USERNAME %r not created: %s", username, exc.detail)
        await session.rollback()
        return None
    return user
