"""Members and roles of organisations, projects and groups (``/api/collections/{id}/…``).

Permission checks are the dependencies of ``flplatform.organizations.dependencies``; adding a
member or granting a role is checked by ``organizations.memberships``, which knows the user.
"""

from __future__ import annotations

from fastapi import Response, status

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Limit, Offset
from flplatform.organizations import memberships
from flplatform.organizations.dependencies import ReadableCollection, RemovableMembership, RevocableRole
from flplatform.organizations.schemas import MemberAdd, MembershipRead, Removed, RoleAdd, RoleRead
from flplatform.users.schemas import UserRead, read_user

TAG = "organizations"
router = APIRouter(prefix="/api/collections", tags=[TAG])


@router.get(
    "/{collection_id}/members/",
    response_model=list[UserRead],
    summary="List members",
    description="Members of an organisation, project or group that the caller can see (members of a group "
    "are members of its project too).",
    responses=responses(401, 404, 422),
)
async def list_members(
    requester: AuthenticatedRequester, collection: ReadableCollection, limit: Limit = 100, offset: Offset = 0
) -> list[UserRead]:
    users = await memberships.visible_members(requester, collection, limit=limit, offset=offset)
    return [read_user(u, viewer=requester) for u in users]


@router.post(
    "/{collection_id}/members/",
    response_model=MembershipRead,
    status_code=status.HTTP_201_CREATED,
    summary="Add a member",
    description="201 with the new membership, or 200 with the existing one. Adding to a group also adds to its "
    "project. Admins, coaches of the collection (a coach of only the group: for users already in the "
    "project) and superusers.",
    responses={
        200: {"description": "Already a member", "model": MembershipRead},
        **responses(401, 403, 404, 422),
    },
)
async def add_member(
    requester: AuthenticatedRequester, collection: ReadableCollection, data: MemberAdd, response: Response
) -> MembershipRead:
    membership, created = await memberships.grant_membership(requester, collection, data.user_id)
    if not created:
        response.status_code = status.HTTP_200_OK
    return MembershipRead.model_validate(membership)


@router.delete(
    "/{collection_id}/members/{user_id}/",
    response_model=Removed,
    summary="Remove a member",
    description="`removed` says whether there was a membership. Leaving a project also leaves its groups.",
    responses=responses(401, 403, 404, 422),
)
async def remove_member(requester: AuthenticatedRequester, membership: RemovableMembership) -> Removed:
    removed = await memberships.remove_member(requester.session, membership.collection, membership.user_id)
    return Removed(removed=removed)


@router.get(
    "/{collection_id}/roles/",
    response_model=list[RoleRead],
    summary="List roles",
    description="Roles held on this collection that the caller can see (their own; all for admins), oldest "
    "first; `limit`/`offset` page them and `X-Total-Count` carries the total.",
    responses=responses(401, 404, 422),
)
async def list_roles(
    requester: AuthenticatedRequester,
    collection: ReadableCollection,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[RoleRead]:
    rows, total = await memberships.readable_roles(requester, collection, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    return [RoleRead.model_validate(r) for r in rows]


@router.post(
    "/{collection_id}/roles/",
    response_model=RoleRead,
    status_code=status.HTTP_201_CREATED,
    summary="Grant a role",
    description="201 with the new role or 200 with the existing one. `admin` only on organisations, `coach` on "
    "any level. Organisation admins and superusers.",
    responses={200: {"description": "Already held", "model": RoleRead}, **responses(401, 403, 404, 422)},
)
async def add_role(
    requester: AuthenticatedRequester, collection: ReadableCollection, data: RoleAdd, response: Response
) -> RoleRead:
    role, created = await memberships.grant_role(requester, collection, data.user_id, data.kind)
    if not created:
        response.status_code = status.HTTP_200_OK
    return RoleRead.model_validate(role)


@router.delete(
    "/{collection_id}/roles/{user_id}/{kind}/",
    response_model=Removed,
    summary="Revoke a role",
    description="`removed` says whether the role was held. Organisation admins and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def remove_role(requester: AuthenticatedRequester, role: RevocableRole) -> Removed:
    removed = await memberships.remove_role(requester.session, role.collection, role.user_id, role.kind)
    return Removed(removed=removed)
