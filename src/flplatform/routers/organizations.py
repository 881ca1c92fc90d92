"""Organisations, projects, groups and ad-hoc groups; members, roles and invitation links; the
DLR wire-contract group routes (``/api/groups/``, ``/api/users/groups/``).

Every handler authorises through ``flplatform.permissions``: lists filter with ``readable``,
single objects the caller may not see are 404, visible objects the caller may not change are 403.
"""

from __future__ import annotations

import datetime as dt
import uuid

from fastapi import APIRouter, Response, status
from sqlalchemy import select

from flplatform.errors import Forbidden, NotFound, Unauthorized, responses
from flplatform.kit.schemas import Limit, Offset
from flplatform.organizations import service
from flplatform.organizations.schemas import (
    CollectionRead,
    CollectionUpdate,
    GroupCreate,
    GroupRead,
    InvitationAccept,
    InvitationCreate,
    InvitationCreated,
    InvitationRead,
    MemberAdd,
    MembershipRead,
    OrganizationCreate,
    OrganizationRead,
    OrganizationSettingsRead,
    ProjectCreate,
    ProjectGroupCreate,
    Removed,
    RoleAdd,
    RoleRead,
    SettingsFields,
)
from flplatform.orm.organizations import GROUP_KINDS, Collection, CollectionKind, Invitation, Role, RoleKind
from flplatform.orm.user import User
from flplatform.permissions import (
    AuthenticatedRequester,
    MembershipDraft,
    Requester,
    RequesterDep,
    RoleDraft,
    can_create,
    can_delete,
    can_read,
    ensure_allowed,
    ensure_readable,
    readable,
)
from flplatform.routers.users import read_user
from flplatform.users import service as user_service
from flplatform.users.schemas import UserRead

TAG = "organizations"
router = APIRouter(prefix="/api/organizations", tags=[TAG])
projects_router = APIRouter(prefix="/api/projects", tags=[TAG])
collections_router = APIRouter(prefix="/api/collections", tags=[TAG])
invitations_router = APIRouter(prefix="/api/invitations", tags=[TAG])
groups_router = APIRouter(prefix="/api/groups", tags=["groups"])
# Mounted before the users router so "groups" is not taken for a user id.
users_groups_router = APIRouter(prefix="/api/users", tags=["groups"])


async def _visible(requester: Requester, collection_id: uuid.UUID, *kinds: CollectionKind) -> Collection:
    collection = await service.get_collection(requester.session, collection_id, *kinds)
    await ensure_readable(requester, collection, f"{collection.kind.value.capitalize()} {collection_id}")
    return collection


def _label(collection: Collection) -> str:
    return f"{collection.kind.value} {collection.id}"


async def _organization_read(requester: Requester, org: Collection) -> OrganizationRead:
    settings = await service.get_settings(requester.session, org.id)
    shown = OrganizationSettingsRead.model_validate(settings) if await can_read(requester, settings) else None
    return OrganizationRead(**CollectionRead.model_validate(org).model_dump(), settings=shown)


# ---------------------------------------------------------------------------- organisations


@router.get(
    "/",
    response_model=list[CollectionRead],
    summary="List organisations",
    description="The organisations the caller can see (their own; every one for superusers). `X-Total-Count` carries the total.",
    responses=responses(401),
)
async def list_organizations(
    requester: AuthenticatedRequester, response: Response, limit: Limit = 100, offset: Offset = 0
) -> list[CollectionRead]:
    rows, total = await service.list_collections(
        requester.session,
        readable(requester, Collection),
        kinds=[CollectionKind.ORGANIZATION],
        limit=limit,
        offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [CollectionRead.model_validate(r) for r in rows]


@router.post(
    "/",
    response_model=OrganizationRead,
    status_code=status.HTTP_201_CREATED,
    summary="Create an organisation",
    description="Superusers create organisations. A user outside every organisation may create one: they join "
    "it and become its admin (seed 004's `create_team`).",
    responses=responses(401, 403, 422),
)
async def create_organization(
    requester: AuthenticatedRequester, data: OrganizationCreate
) -> OrganizationRead:
    org = service.new_organization(data.name)
    await ensure_allowed(requester, "create", org, "an organisation")
    founder = requester.user if requester.is_unorganised else None
    await service.create_organization(
        requester.session, org, data.model_dump(exclude={"name"}), founder=founder
    )
    await requester.reload()
    return await _organization_read(requester, org)


@router.get(
    "/{organization_id}/",
    response_model=OrganizationRead,
    summary="Get an organisation",
    description="With its settings.",
    responses=responses(401, 404, 422),
)
async def get_organization(requester: AuthenticatedRequester, organization_id: uuid.UUID) -> OrganizationRead:
    org = await _visible(requester, organization_id, CollectionKind.ORGANIZATION)
    return await _organization_read(requester, org)


@router.patch(
    "/{organization_id}/",
    response_model=OrganizationRead,
    summary="Rename an organisation",
    description="Organisation admins and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def update_organization(
    requester: AuthenticatedRequester, organization_id: uuid.UUID, data: CollectionUpdate
) -> OrganizationRead:
    org = await service.get_collection(requester.session, organization_id, CollectionKind.ORGANIZATION)
    await ensure_allowed(requester, "update", org, _label(org))
    await service.rename_collection(requester.session, org, data.name)
    return await _organization_read(requester, org)


@router.delete(
    "/{organization_id}/",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an organisation",
    description="Superusers only; refused with 409 while the organisation still has users. Deletes its "
    "projects, groups, memberships, roles and invitations.",
    responses=responses(401, 403, 404, 409, 422),
)
async def delete_organization(requester: AuthenticatedRequester, organization_id: uuid.UUID) -> Response:
    org = await service.get_collection(requester.session, organization_id, CollectionKind.ORGANIZATION)
    await ensure_allowed(requester, "delete", org, _label(org))
    await service.delete_collection(requester.session, org)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{organization_id}/settings/",
    response_model=OrganizationSettingsRead,
    summary="Get organisation settings",
    description="Description, location and what members may do themselves (seed 003's FacilityDataset).",
    responses=responses(401, 404, 422),
)
async def get_settings(
    requester: AuthenticatedRequester, organization_id: uuid.UUID
) -> OrganizationSettingsRead:
    await _visible(requester, organization_id, CollectionKind.ORGANIZATION)
    settings = await service.get_settings(requester.session, organization_id)
    await ensure_readable(requester, settings, f"Settings of organization {organization_id}")
    return OrganizationSettingsRead.model_validate(settings)


@router.patch(
    "/{organization_id}/settings/",
    response_model=OrganizationSettingsRead,
    summary="Change organisation settings",
    description="Organisation admins and superusers. The `members_can_*` switches are enforced by the user routes.",
    responses=responses(401, 403, 404, 422),
)
async def update_settings(
    requester: AuthenticatedRequester, organization_id: uuid.UUID, data: SettingsFields
) -> OrganizationSettingsRead:
    await _visible(requester, organization_id, CollectionKind.ORGANIZATION)
    settings = await service.get_settings(requester.session, organization_id)
    await ensure_allowed(requester, "update", settings, f"the settings of organization {organization_id}")
    await service.update_settings(requester.session, settings, data.model_dump(exclude_unset=True))
    return OrganizationSettingsRead.model_validate(settings)


# ---------------------------------------------------------------------------- projects


@router.get(
    "/{organization_id}/projects/",
    response_model=list[CollectionRead],
    summary="List an organisation's projects",
    description="The projects the caller can see. `X-Total-Count` carries the total.",
    responses=responses(401, 404, 422),
)
async def list_projects(
    requester: AuthenticatedRequester,
    organization_id: uuid.UUID,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[CollectionRead]:
    await _visible(requester, organization_id, CollectionKind.ORGANIZATION)
    rows, total = await service.list_collections(
        requester.session,
        readable(requester, Collection),
        kinds=[CollectionKind.PROJECT],
        parent_id=organization_id,
        limit=limit,
        offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [CollectionRead.model_validate(r) for r in rows]


@router.post(
    "/{organization_id}/projects/",
    response_model=CollectionRead,
    status_code=status.HTTP_201_CREATED,
    summary="Create a project",
    description="Organisation admins and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def create_project(
    requester: AuthenticatedRequester, organization_id: uuid.UUID, data: ProjectCreate
) -> CollectionRead:
    org = await _visible(requester, organization_id, CollectionKind.ORGANIZATION)
    project = service.new_child(org, CollectionKind.PROJECT, data.name)
    await ensure_allowed(requester, "create", project, f"a project in organization {organization_id}")
    return CollectionRead.model_validate(await service.save_collection(requester.session, project))


@projects_router.get(
    "/{project_id}/",
    response_model=CollectionRead,
    summary="Get a project",
    responses=responses(401, 404, 422),
)
async def get_project(requester: AuthenticatedRequester, project_id: uuid.UUID) -> CollectionRead:
    return CollectionRead.model_validate(await _visible(requester, project_id, CollectionKind.PROJECT))


@projects_router.patch(
    "/{project_id}/",
    response_model=CollectionRead,
    summary="Rename a project",
    description="Organisation admins and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def update_project(
    requester: AuthenticatedRequester, project_id: uuid.UUID, data: CollectionUpdate
) -> CollectionRead:
    project = await service.get_collection(requester.session, project_id, CollectionKind.PROJECT)
    await ensure_allowed(requester, "update", project, _label(project))
    return CollectionRead.model_validate(
        await service.rename_collection(requester.session, project, data.name)
    )


@projects_router.delete(
    "/{project_id}/",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a project",
    description="Organisation admins and superusers; deletes its groups, memberships and roles.",
    responses=responses(401, 403, 404, 422),
)
async def delete_project(requester: AuthenticatedRequester, project_id: uuid.UUID) -> Response:
    project = await service.get_collection(requester.session, project_id, CollectionKind.PROJECT)
    await ensure_allowed(requester, "delete", project, _label(project))
    await service.delete_collection(requester.session, project)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@projects_router.get(
    "/{project_id}/groups/",
    response_model=list[GroupRead],
    summary="List a project's groups",
    description="Groups and ad-hoc groups the caller can see. `X-Total-Count` carries the total.",
    responses=responses(401, 404, 422),
)
async def list_project_groups(
    requester: AuthenticatedRequester,
    project_id: uuid.UUID,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[GroupRead]:
    await _visible(requester, project_id, CollectionKind.PROJECT)
    rows, total = await service.list_collections(
        requester.session,
        readable(requester, Collection),
        kinds=GROUP_KINDS,
        parent_id=project_id,
        limit=limit,
        offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [GroupRead.model_validate(r) for r in rows]


@projects_router.post(
    "/{project_id}/groups/",
    response_model=GroupRead,
    status_code=status.HTTP_201_CREATED,
    summary="Create a group or ad-hoc group",
    description="Organisation admins, coaches of the project and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def create_project_group(
    requester: AuthenticatedRequester, project_id: uuid.UUID, data: ProjectGroupCreate
) -> GroupRead:
    project = await _visible(requester, project_id, CollectionKind.PROJECT)
    return await _create_group(requester, project, data.name, CollectionKind(data.kind))


async def _create_group(
    requester: Requester, project: Collection, name: str, kind: CollectionKind
) -> GroupRead:
    group = service.new_child(project, kind, name)
    await ensure_allowed(requester, "create", group, f"a group in project {project.id}")
    return GroupRead.model_validate(await service.save_collection(requester.session, group))


# ---------------------------------------------------------------------------- DLR /api/groups/


@groups_router.get(
    "/",
    response_model=list[GroupRead],
    summary="List groups",
    description="DLR wire contract (`[{id, name}]`, plus the hierarchy). The reference lets only superusers "
    "list groups; here everyone lists the groups they can see (superusers: all). Ids are UUIDs.",
    responses=responses(401),
)
async def list_groups(
    requester: AuthenticatedRequester, response: Response, limit: Limit = 1000, offset: Offset = 0
) -> list[GroupRead]:
    rows, total = await service.list_collections(
        requester.session, readable(requester, Collection), kinds=GROUP_KINDS, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return [GroupRead.model_validate(r) for r in rows]


@groups_router.post(
    "/",
    response_model=GroupRead,
    status_code=status.HTTP_201_CREATED,
    summary="Create a group",
    description='DLR wire contract: `{"name"}`. Without `project_id` the group goes into the caller\'s '
    "organisation's `default` project (made on first use). Admins and project coaches only; users outside "
    "organisations get 403.",
    responses=responses(401, 403, 404, 422),
)
async def create_group(requester: AuthenticatedRequester, data: GroupCreate) -> GroupRead:
    if data.project_id is not None:
        project = await _visible(requester, data.project_id, CollectionKind.PROJECT)
    elif requester.in_organization and requester.is_org_admin:
        project = await service.default_project(requester.session, requester.organization_id)  # type: ignore[arg-type]
    elif requester.in_organization:
        raise Forbidden("Only organisation admins may create groups without a project_id.")
    elif requester.is_superuser:
        raise NotFound("Superusers belong to no organisation: give a project_id.", code="project_required")
    else:
        raise Forbidden("Join or create an organisation before creating groups.", code="no_organization")
    return await _create_group(requester, project, data.name, CollectionKind(data.kind))


@groups_router.get(
    "/{group_id}/", response_model=GroupRead, summary="Get a group", responses=responses(401, 404, 422)
)
async def get_group(requester: AuthenticatedRequester, group_id: uuid.UUID) -> GroupRead:
    return GroupRead.model_validate(await _visible(requester, group_id, *GROUP_KINDS))


async def _rename_group(requester: Requester, group_id: uuid.UUID, data: CollectionUpdate) -> GroupRead:
    group = await service.get_collection(requester.session, group_id, *GROUP_KINDS)
    await ensure_allowed(requester, "update", group, _label(group))
    return GroupRead.model_validate(await service.rename_collection(requester.session, group, data.name))


@groups_router.put(
    "/{group_id}/",
    response_model=GroupRead,
    summary="Rename a group",
    description="Organisation admins, coaches of the group's project and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def put_group(
    requester: AuthenticatedRequester, group_id: uuid.UUID, data: CollectionUpdate
) -> GroupRead:
    return await _rename_group(requester, group_id, data)


@groups_router.patch(
    "/{group_id}/",
    response_model=GroupRead,
    summary="Rename a group (same as PUT)",
    responses=responses(401, 403, 404, 422),
)
async def patch_group(
    requester: AuthenticatedRequester, group_id: uuid.UUID, data: CollectionUpdate
) -> GroupRead:
    return await _rename_group(requester, group_id, data)


@groups_router.delete(
    "/{group_id}/",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a group",
    description="Organisation admins, coaches of the group's project and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def delete_group(requester: AuthenticatedRequester, group_id: uuid.UUID) -> Response:
    group = await service.get_collection(requester.session, group_id, *GROUP_KINDS)
    await ensure_allowed(requester, "delete", group, _label(group))
    await service.delete_collection(requester.session, group)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@users_groups_router.get(
    "/groups/",
    response_model=list[GroupRead],
    summary="My groups",
    description="DLR wire contract: the groups (and ad-hoc groups) the caller is a member of.",
    responses=responses(401),
)
async def my_groups(requester: AuthenticatedRequester) -> list[GroupRead]:
    rows = await service.member_collections(requester.session, requester.id, GROUP_KINDS)  # type: ignore[arg-type]
    return [GroupRead.model_validate(r) for r in rows]


# ---------------------------------------------------------------------------- members and roles


async def _target_user(requester: Requester, collection: Collection, user_id: uuid.UUID) -> User:
    """A user of the collection's organisation; users elsewhere are 404 (never revealed)."""
    user = await requester.session.get(User, user_id)
    if user is None or user.organization_id != collection.organization_id:
        raise NotFound(f"User {user_id} not found.")
    return user


@collections_router.get(
    "/{collection_id}/members/",
    response_model=list[UserRead],
    summary="List members",
    description="Members of an organisation, project or group that the caller can see (members of a group "
    "are members of its project too).",
    responses=responses(401, 404, 422),
)
async def list_members(
    requester: AuthenticatedRequester, collection_id: uuid.UUID, limit: Limit = 100, offset: Offset = 0
) -> list[UserRead]:
    collection = await _visible(requester, collection_id)
    users = await service.list_members(requester.session, collection, limit=limit, offset=offset)
    visible_ids = set(
        (
            await requester.session.execute(
                select(User.id).where(User.id.in_([u.id for u in users]), readable(requester, User))
            )
        ).scalars()
    )
    return [read_user(u, viewer=requester) for u in users if u.id in visible_ids]


@collections_router.post(
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
    requester: AuthenticatedRequester, collection_id: uuid.UUID, data: MemberAdd, response: Response
) -> MembershipRead:
    collection = await _visible(requester, collection_id)
    user = await _target_user(requester, collection, data.user_id)
    draft = MembershipDraft(collection=collection, user_id=user.id, user_organization_id=user.organization_id)
    await ensure_allowed(requester, "create", draft, f"members of {_label(collection)}")
    membership, created = await service.add_member(requester.session, collection, user)
    if not created:
        response.status_code = status.HTTP_200_OK
    return MembershipRead.model_validate(membership)


@collections_router.delete(
    "/{collection_id}/members/{user_id}/",
    response_model=Removed,
    summary="Remove a member",
    description="`removed` says whether there was a membership. Leaving a project also leaves its groups.",
    responses=responses(401, 403, 404, 422),
)
async def remove_member(
    requester: AuthenticatedRequester, collection_id: uuid.UUID, user_id: uuid.UUID
) -> Removed:
    collection = await _visible(requester, collection_id)
    user = await _target_user(requester, collection, user_id)
    draft = MembershipDraft(collection=collection, user_id=user.id, user_organization_id=user.organization_id)
    # The collection is visible, so a refusal is 403 whether or not the membership exists.
    if not await can_delete(requester, draft):
        raise Forbidden(f"You may not remove members of {_label(collection)}.")
    return Removed(removed=await service.remove_member(requester.session, collection, user.id))


@collections_router.get(
    "/{collection_id}/roles/",
    response_model=list[RoleRead],
    summary="List roles",
    description="Roles held on this collection that the caller can see (their own; all for admins).",
    responses=responses(401, 404, 422),
)
async def list_roles(requester: AuthenticatedRequester, collection_id: uuid.UUID) -> list[RoleRead]:
    collection = await _visible(requester, collection_id)
    stmt = (
        select(Role)
        .where(Role.collection_id == collection.id, readable(requester, Role))
        .order_by(Role.created_at)
    )
    return [RoleRead.model_validate(r) for r in (await requester.session.execute(stmt)).scalars()]


@collections_router.post(
    "/{collection_id}/roles/",
    response_model=RoleRead,
    status_code=status.HTTP_201_CREATED,
    summary="Grant a role",
    description="201 with the new role or 200 with the existing one. `admin` only on organisations, `coach` on "
    "any level. Organisation admins and superusers.",
    responses={200: {"description": "Already held", "model": RoleRead}, **responses(401, 403, 404, 422)},
)
async def add_role(
    requester: AuthenticatedRequester, collection_id: uuid.UUID, data: RoleAdd, response: Response
) -> RoleRead:
    collection = await _visible(requester, collection_id)
    user = await _target_user(requester, collection, data.user_id)
    draft = RoleDraft(
        collection=collection, user_id=user.id, user_organization_id=user.organization_id, kind=data.kind
    )
    await ensure_allowed(requester, "create", draft, f"roles on {_label(collection)}")
    role, created = await service.add_role(requester.session, collection, user, data.kind)
    if not created:
        response.status_code = status.HTTP_200_OK
    return RoleRead.model_validate(role)


@collections_router.delete(
    "/{collection_id}/roles/{user_id}/{kind}/",
    response_model=Removed,
    summary="Revoke a role",
    description="`removed` says whether the role was held. Organisation admins and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def remove_role(
    requester: AuthenticatedRequester, collection_id: uuid.UUID, user_id: uuid.UUID, kind: RoleKind
) -> Removed:
    collection = await _visible(requester, collection_id)
    user = await _target_user(requester, collection, user_id)
    draft = RoleDraft(
        collection=collection, user_id=user.id, user_organization_id=user.organization_id, kind=kind
    )
    # The collection is visible, so a refusal is 403 whether or not the role exists.
    if not await can_delete(requester, draft):
        raise Forbidden(f"You may not revoke roles on {_label(collection)}.")
    return Removed(removed=await service.remove_role(requester.session, collection, user.id, kind))


# ---------------------------------------------------------------------------- invitations


@router.get(
    "/{organization_id}/invitations/",
    response_model=list[InvitationRead],
    summary="List invitation links",
    description="Organisation admins and superusers. Tokens are never shown again.",
    responses=responses(401, 403, 404, 422),
)
async def list_invitations(
    requester: AuthenticatedRequester, organization_id: uuid.UUID
) -> list[InvitationRead]:
    org = await _visible(requester, organization_id, CollectionKind.ORGANIZATION)
    await _ensure_invitation_admin(requester, org)
    return [
        InvitationRead.model_validate(r) for r in await service.list_invitations(requester.session, org.id)
    ]


async def _ensure_invitation_admin(requester: Requester, org: Collection) -> None:
    if not await can_create(requester, Invitation(organization_id=org.id)):
        raise Forbidden(f"Only admins manage the invitations of organization {org.id}.")


@router.post(
    "/{organization_id}/invitations/",
    response_model=InvitationCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an invitation link",
    description="A random token (shown once; only a digest is stored) that lets one user join the organisation "
    "as a member, until it expires, is revoked or has been used `max_uses` times.",
    responses=responses(401, 403, 404, 422),
)
async def create_invitation(
    requester: AuthenticatedRequester, organization_id: uuid.UUID, data: InvitationCreate
) -> InvitationCreated:
    org = await _visible(requester, organization_id, CollectionKind.ORGANIZATION)
    await _ensure_invitation_admin(requester, org)
    row, token = await service.create_invitation(
        requester.session,
        org.id,
        by=requester.user,
        expires_in=dt.timedelta(hours=data.expires_in_hours),
        max_uses=data.max_uses,
        note=data.note,
    )
    return InvitationCreated(**InvitationRead.model_validate(row).model_dump(), token=token)


@router.delete(
    "/{organization_id}/invitations/{invitation_id}/",
    response_model=InvitationRead,
    summary="Revoke an invitation link",
    responses=responses(401, 403, 404, 422),
)
async def revoke_invitation(
    requester: AuthenticatedRequester, organization_id: uuid.UUID, invitation_id: uuid.UUID
) -> InvitationRead:
    org = await _visible(requester, organization_id, CollectionKind.ORGANIZATION)
    await _ensure_invitation_admin(requester, org)
    row = await service.get_invitation(requester.session, org.id, invitation_id)
    return InvitationRead.model_validate(await service.revoke_invitation(requester.session, row))


@invitations_router.post(
    "/accept/",
    response_model=UserRead,
    summary="Accept an invitation link",
    description='An authenticated user outside every organisation joins it with `{"token"}`. An anonymous '
    'caller signs up with `{"token", "user": {...}}` if the organisation lets members sign up; the response '
    "then carries the new user's `token`. Unknown, expired, revoked or used-up links are 404.",
    responses=responses(401, 403, 404, 409, 422),
)
async def accept_invitation(requester: RequesterDep, data: InvitationAccept) -> UserRead:
    session = requester.session
    if requester.is_anonymous and data.user is None:
        raise Unauthorized("Log in to join, or send `user` to sign up.")
    if not requester.is_anonymous and data.user is not None:
        raise Forbidden(
            "You are logged in: accept without `user` to join with your account.", code="already_user"
        )
    invitation = await service.redeem_invitation(session, data.token)
    if requester.user is not None:
        user = await service.join_organization(session, requester.user, invitation.organization_id)
        return UserRead.model_validate(user)
    assert data.user is not None
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
    out = UserRead.model_validate(user)
    out.token = token
    return out


# Mounted by app.py (``users_groups_router`` separately, before the users router).
ALL_ROUTERS = (router, projects_router, collections_router, invitations_router, groups_router)
