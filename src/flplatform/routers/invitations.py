"""Invitation links: organisation admins make, list and revoke them
(``/api/organizations/{id}/invitations/``); users join or sign up with one
(``/api/invitations/accept/``)."""

from __future__ import annotations

import datetime as dt

from fastapi import Response, status

from flplatform.auth.dependencies import AuthenticatedRequester, RequesterDep
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Limit, Offset
from flplatform.organizations import invitations
from flplatform.organizations.dependencies import InvitingOrganization, ManagedInvitation
from flplatform.organizations.schemas import (
    InvitationAccept,
    InvitationCreate,
    InvitationCreated,
    InvitationRead,
)
from flplatform.users.schemas import UserRead

TAG = "organizations"
organization_invitations_router = APIRouter(prefix="/api/organizations", tags=[TAG])
router = APIRouter(prefix="/api/invitations", tags=[TAG])


@organization_invitations_router.get(
    "/{organization_id}/invitations/",
    response_model=list[InvitationRead],
    summary="List invitation links",
    description="Organisation admins and superusers, newest first. Tokens are never shown again. "
    "`X-Total-Count` carries the total.",
    responses=responses(401, 403, 404, 422),
)
async def list_invitations(
    requester: AuthenticatedRequester,
    response: Response,
    org: InvitingOrganization,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[InvitationRead]:
    rows, total = await invitations.list_invitations(requester.session, org.id, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [InvitationRead.model_validate(r) for r in rows]


@organization_invitations_router.post(
    "/{organization_id}/invitations/",
    response_model=InvitationCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an invitation link",
    description="A random token (shown once; only a digest is stored) that lets one user join the organisation "
    "as a member, until it expires, is revoked or has been used `max_uses` times.",
    responses=responses(401, 403, 404, 422),
)
async def create_invitation(
    requester: AuthenticatedRequester, org: InvitingOrganization, data: InvitationCreate
) -> InvitationCreated:
    row, token = await invitations.create_invitation(
        requester.session,
        org.id,
        by=requester.user,
        expires_in=dt.timedelta(hours=data.expires_in_hours),
        max_uses=data.max_uses,
        note=data.note,
    )
    return InvitationCreated(**InvitationRead.model_validate(row).model_dump(), token=token)


@organization_invitations_router.delete(
    "/{organization_id}/invitations/{invitation_id}/",
    response_model=InvitationRead,
    summary="Revoke an invitation link",
    responses=responses(401, 403, 404, 422),
)
async def revoke_invitation(
    requester: AuthenticatedRequester, invitation: ManagedInvitation
) -> InvitationRead:
    return InvitationRead.model_validate(await invitations.revoke_invitation(requester.session, invitation))


@router.post(
    "/accept/",
    response_model=UserRead,
    summary="Accept an invitation link",
    description='An authenticated user outside every organisation joins it with `{"token"}`. An anonymous '
    'caller signs up with `{"token", "user": {...}}` if the organisation lets members sign up; the response '
    "then carries the new user's `token`. Unknown, expired, revoked or used-up links are 404.",
    responses=responses(401, 403, 404, 409, 422),
)
async def accept_invitation(requester: RequesterDep, data: InvitationAccept) -> UserRead:
    user, token = await invitations.accept_invitation(requester, data)
    out = UserRead.model_validate(user)
    out.token = token
    return out
