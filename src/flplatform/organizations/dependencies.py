"""Permission checks on organisations, projects, groups, settings, memberships, roles and
invitations as FastAPI dependencies (Polar's ``auth.py`` annotations): a route declares
``org: ManagedOrganization`` and receives an object the caller may change, or never runs.

The answers are those of ``flplatform.permissions``: an object the caller may not see is 404 (its
existence is not revealed), one they see but may not change is 403. Each dependency reads every
path parameter it needs itself (in the route's order) so the OpenAPI parameters keep their order.
Checks on objects that do not exist yet (a new project, member, role) need the request body and
are made with the requester by the service functions that create them (``service.create_*``,
``memberships.grant_*``).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.errors import Forbidden
from flplatform.organizations import invitations, memberships, service
from flplatform.organizations.service import collection_label, get_visible_collection
from flplatform.orm.organizations import (
    GROUP_KINDS,
    Collection,
    CollectionKind,
    Invitation,
    OrganizationSettings,
    RoleKind,
)
from flplatform.permissions import (
    Action,
    MembershipDraft,
    Requester,
    RoleDraft,
    can_create,
    can_delete,
    ensure_allowed,
    ensure_readable,
)


async def _allowed_collection(
    requester: Requester, action: Action, collection_id: uuid.UUID, *kinds: CollectionKind
) -> Collection:
    collection = await service.get_collection(requester.session, collection_id, *kinds)
    await ensure_allowed(requester, action, collection, collection_label(collection))
    return collection


# ---------------------------------------------------------------------------- organisations


async def readable_organization(requester: AuthenticatedRequester, organization_id: uuid.UUID) -> Collection:
    return await get_visible_collection(requester, organization_id, CollectionKind.ORGANIZATION)


async def managed_organization(requester: AuthenticatedRequester, organization_id: uuid.UUID) -> Collection:
    return await _allowed_collection(requester, "update", organization_id, CollectionKind.ORGANIZATION)


async def deletable_organization(requester: AuthenticatedRequester, organization_id: uuid.UUID) -> Collection:
    return await _allowed_collection(requester, "delete", organization_id, CollectionKind.ORGANIZATION)


ReadableOrganization = Annotated[Collection, Depends(readable_organization)]
ManagedOrganization = Annotated[Collection, Depends(managed_organization)]
DeletableOrganization = Annotated[Collection, Depends(deletable_organization)]


async def readable_settings(
    requester: AuthenticatedRequester, organization: ReadableOrganization
) -> OrganizationSettings:
    settings = await service.get_settings(requester.session, organization.id)
    await ensure_readable(requester, settings, f"Settings of organization {organization.id}")
    return settings


async def managed_settings(
    requester: AuthenticatedRequester, organization: ReadableOrganization
) -> OrganizationSettings:
    settings = await service.get_settings(requester.session, organization.id)
    await ensure_allowed(requester, "update", settings, f"the settings of organization {organization.id}")
    return settings


ReadableSettings = Annotated[OrganizationSettings, Depends(readable_settings)]
ManagedSettings = Annotated[OrganizationSettings, Depends(managed_settings)]


# ---------------------------------------------------------------------------- projects and groups


async def readable_project(requester: AuthenticatedRequester, project_id: uuid.UUID) -> Collection:
    return await get_visible_collection(requester, project_id, CollectionKind.PROJECT)


async def managed_project(requester: AuthenticatedRequester, project_id: uuid.UUID) -> Collection:
    return await _allowed_collection(requester, "update", project_id, CollectionKind.PROJECT)


async def deletable_project(requester: AuthenticatedRequester, project_id: uuid.UUID) -> Collection:
    return await _allowed_collection(requester, "delete", project_id, CollectionKind.PROJECT)


async def readable_group(requester: AuthenticatedRequester, group_id: uuid.UUID) -> Collection:
    return await get_visible_collection(requester, group_id, *GROUP_KINDS)


async def managed_group(requester: AuthenticatedRequester, group_id: uuid.UUID) -> Collection:
    return await _allowed_collection(requester, "update", group_id, *GROUP_KINDS)


async def deletable_group(requester: AuthenticatedRequester, group_id: uuid.UUID) -> Collection:
    return await _allowed_collection(requester, "delete", group_id, *GROUP_KINDS)


async def readable_collection(requester: AuthenticatedRequester, collection_id: uuid.UUID) -> Collection:
    """An organisation, project, group or ad-hoc group the caller can see."""
    return await get_visible_collection(requester, collection_id)


ReadableProject = Annotated[Collection, Depends(readable_project)]
ManagedProject = Annotated[Collection, Depends(managed_project)]
DeletableProject = Annotated[Collection, Depends(deletable_project)]
ReadableGroup = Annotated[Collection, Depends(readable_group)]
ManagedGroup = Annotated[Collection, Depends(managed_group)]
DeletableGroup = Annotated[Collection, Depends(deletable_group)]
ReadableCollection = Annotated[Collection, Depends(readable_collection)]


# ---------------------------------------------------------------------------- memberships and roles


async def removable_membership(
    requester: AuthenticatedRequester, collection_id: uuid.UUID, user_id: uuid.UUID
) -> MembershipDraft:
    """The (possibly absent) membership of ``user_id`` in a visible collection that the caller may
    remove. The collection is visible, so a refusal is 403 whether or not the membership exists."""
    collection = await get_visible_collection(requester, collection_id)
    user = await memberships.organization_user(requester.session, collection, user_id)
    draft = MembershipDraft(collection=collection, user_id=user.id, user_organization_id=user.organization_id)
    if not await can_delete(requester, draft):
        raise Forbidden(f"You may not remove members of {collection_label(collection)}.")
    return draft


async def revocable_role(
    requester: AuthenticatedRequester, collection_id: uuid.UUID, user_id: uuid.UUID, kind: RoleKind
) -> RoleDraft:
    """The (possibly absent) role that the caller may revoke; 403 whether or not it is held."""
    collection = await get_visible_collection(requester, collection_id)
    user = await memberships.organization_user(requester.session, collection, user_id)
    draft = RoleDraft(
        collection=collection, user_id=user.id, user_organization_id=user.organization_id, kind=kind
    )
    if not await can_delete(requester, draft):
        raise Forbidden(f"You may not revoke roles on {collection_label(collection)}.")
    return draft


RemovableMembership = Annotated[MembershipDraft, Depends(removable_membership)]
RevocableRole = Annotated[RoleDraft, Depends(revocable_role)]


# ---------------------------------------------------------------------------- invitations


async def _ensure_invitation_admin(requester: Requester, organization: Collection) -> None:
    if not await can_create(requester, Invitation(organization_id=organization.id)):
        raise Forbidden(f"Only admins manage the invitations of organization {organization.id}.")


async def inviting_organization(requester: AuthenticatedRequester, organization_id: uuid.UUID) -> Collection:
    """A visible organisation whose invitation links the caller manages (admins, superusers)."""
    organization = await get_visible_collection(requester, organization_id, CollectionKind.ORGANIZATION)
    await _ensure_invitation_admin(requester, organization)
    return organization


async def managed_invitation(
    requester: AuthenticatedRequester, organization_id: uuid.UUID, invitation_id: uuid.UUID
) -> Invitation:
    organization = await inviting_organization(requester, organization_id)
    return await invitations.get_invitation(requester.session, organization.id, invitation_id)


InvitingOrganization = Annotated[Collection, Depends(inviting_organization)]
ManagedInvitation = Annotated[Invitation, Depends(managed_invitation)]
