"""Invitation links: an organisation admin makes a link, a user outside every organisation joins
with it, or an anonymous caller signs up with it. Flushes, never commits.

Only a keyed digest of a link's token is stored (shown once, like API tokens). Who may manage the
links is decided by ``flplatform.organizations.dependencies``; redeeming is open to anyone holding
a usable token.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.auth.credentials import token_digest
from flplatform.errors import Conflict, Forbidden, NotFound, Unauthorized
from flplatform.kit.pagination import paginate
from flplatform.organizations import service
from flplatform.organizations.schemas import InvitationAccept
from flplatform.orm.base import utcnow
from flplatform.orm.organizations import Invitation
from flplatform.orm.user import User
from flplatform.permissions import Requester
from flplatform.users import service as user_service


def new_invitation_token() -> str:
    return "inv_" + secrets.token_urlsafe(32)


async def create_invitation(
    session: AsyncSession,
    organization_id: uuid.UUID,
    *,
    by: User | None,
    expires_in: dt.timedelta,
    max_uses: int | None,
    note: str,
) -> tuple[Invitation, str]:
    """A random link token; only its keyed digest is stored (shown once, like API tokens)."""
    token = new_invitation_token()
    row = Invitation(
        organization_id=organization_id,
        digest=token_digest(token),
        prefix=token[:12],
        note=note,
        created_by_id=by.id if by else None,
        created_at=utcnow(),
        expires_at=utcnow() + expires_in,
        max_uses=max_uses,
    )
    session.add(row)
    await session.flush()
    return row, token


async def list_invitations(
    session: AsyncSession, organization_id: uuid.UUID, *, limit: int = 100, offset: int = 0
) -> tuple[list[Invitation], int]:
    """A page of the organisation's invitation links, newest first, and their total."""
    return await paginate(
        session,
        select(Invitation).where(Invitation.organization_id == organization_id),
        order_by=(Invitation.created_at.desc(), Invitation.id),
        limit=limit,
        offset=offset,
    )


async def get_invitation(
    session: AsyncSession, organization_id: uuid.UUID, invitation_id: uuid.UUID
) -> Invitation:
    row = await session.get(Invitation, invitation_id)
    if row is None or row.organization_id != organization_id:
        raise NotFound(f"Invitation {invitation_id} not found.")
    return row


async def revoke_invitation(session: AsyncSession, invitation: Invitation) -> Invitation:
    if invitation.revoked_at is None:
        invitation.revoked_at = utcnow()
    await session.flush()
    return invitation


async def redeem_invitation(session: AsyncSession, token: str) -> Invitation:
    """The usable invitation for ``token`` with its use counted (row-locked on PostgreSQL so
    ``max_uses`` holds under concurrency). Unknown, expired, revoked and used-up links are all 404:
    the answer does not tell which tokens ever existed."""
    stmt = select(Invitation).where(Invitation.digest == token_digest(token)).with_for_update()
    row = (await session.execute(stmt)).scalar_one_or_none()
    if row is None or not row.is_usable(utcnow()):
        raise NotFound("Invitation not found, expired or revoked.", code="invitation_invalid")
    row.uses += 1
    await session.flush()
    return row


async def join_organization(session: AsyncSession, user: User, organization_id: uuid.UUID) -> User:
    if user.organization_id is not None:
        raise Conflict("You already belong to an organisation.", code="already_in_organization")
    if user.is_superuser:
        raise Conflict("Superusers stay outside organisations.", code="superuser_has_no_organization")
    user.organization_id = organization_id
    await session.flush()
    return user


async def accept_invitation(requester: Requester, data: InvitationAccept) -> tuple[User, str | None]:
    """Redeem ``data.token``: an authenticated user outside every organisation joins it; an
    anonymous caller with ``data.user`` signs up into it if its settings allow. Returns the user
    and, for a sign-up, the new user's primary token."""
    session = requester.session
    if requester.is_anonymous and data.user is None:
        raise Unauthorized("Log in to join, or send `user` to sign up.")
    if not requester.is_anonymous and data.user is not None:
        raise Forbidden(
            "You are logged in: accept without `user` to join with your account.", code="already_user"
        )
    invitation = await redeem_invitation(session, data.token)
    if requester.user is not None:
        return await join_organization(session, requester.user, invitation.organization_id), None
    assert data.user is not None  # anonymous without a user was refused above
    settings = await service.get_settings(session, invitation.organization_id)
    if not settings.members_can_sign_up:
        raise Forbidden(
            "This organisation does not let members sign up; ask an admin.", code="sign_up_disabled"
        )
    if data.user.is_staff or data.user.is_superuser:
        raise Forbidden("Invitation sign-up cannot create staff or superusers.")
    user, token = await user_service.create_user(session, data.user, created_by=None)
    user.organization_id = invitation.organization_id
    await session.flush()
    return user, token
