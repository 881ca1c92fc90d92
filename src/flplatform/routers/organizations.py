"""Organisations and their settings (``/api/organizations/``), and the list of every router of the
organisation tree that app.py mounts.

Permission checks are the dependencies of ``flplatform.organizations.dependencies``: lists show
what the caller can see, single objects the caller may not see are 404, visible objects the
caller may not change are 403. Projects and groups are in ``routers.groups``, members and roles in
``routers.memberships``, invitation links in ``routers.invitations``.
"""

from __future__ import annotations

from fastapi import Response, status

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import Limit, Offset
from flplatform.organizations import service
from flplatform.organizations.dependencies import (
    DeletableOrganization,
    ManagedOrganization,
    ManagedSettings,
    ReadableOrganization,
    ReadableSettings,
)
from flplatform.organizations.schemas import (
    CollectionRead,
    CollectionUpdate,
    OrganizationCreate,
    OrganizationRead,
    OrganizationSettingsRead,
    SettingsFields,
)
from flplatform.orm.organizations import Collection, CollectionKind
from flplatform.permissions import Requester
from flplatform.routers import groups, invitations, memberships

TAG = "organizations"
router = APIRouter(prefix="/api/organizations", tags=[TAG])


async def _organization_read(requester: Requester, org: Collection) -> OrganizationRead:
    settings = await service.readable_settings(requester, org)
    shown = OrganizationSettingsRead.model_validate(settings) if settings is not None else None
    return OrganizationRead(**CollectionRead.model_validate(org).model_dump(), settings=shown)


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
        requester, [CollectionKind.ORGANIZATION], limit=limit, offset=offset
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
    org = await service.create_organization(requester, data)
    return await _organization_read(requester, org)


@router.get(
    "/{organization_id}/",
    response_model=OrganizationRead,
    summary="Get an organisation",
    description="With its settings.",
    responses=responses(401, 404, 422),
)
async def get_organization(requester: AuthenticatedRequester, org: ReadableOrganization) -> OrganizationRead:
    return await _organization_read(requester, org)


@router.patch(
    "/{organization_id}/",
    response_model=OrganizationRead,
    summary="Rename an organisation",
    description="Organisation admins and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def update_organization(
    requester: AuthenticatedRequester, org: ManagedOrganization, data: CollectionUpdate
) -> OrganizationRead:
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
async def delete_organization(requester: AuthenticatedRequester, org: DeletableOrganization) -> Response:
    await service.delete_collection(requester.session, org)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{organization_id}/settings/",
    response_model=OrganizationSettingsRead,
    summary="Get organisation settings",
    description="Description, location and what members may do themselves (seed 003's FacilityDataset).",
    responses=responses(401, 404, 422),
)
async def get_settings(settings: ReadableSettings) -> OrganizationSettingsRead:
    return OrganizationSettingsRead.model_validate(settings)


@router.patch(
    "/{organization_id}/settings/",
    response_model=OrganizationSettingsRead,
    summary="Change organisation settings",
    description="Organisation admins and superusers. The `members_can_*` switches are enforced by the user routes.",
    responses=responses(401, 403, 404, 422),
)
async def update_settings(
    requester: AuthenticatedRequester, settings: ManagedSettings, data: SettingsFields
) -> OrganizationSettingsRead:
    await service.update_settings(requester.session, settings, data.model_dump(exclude_unset=True))
    return OrganizationSettingsRead.model_validate(settings)


# Mounted by app.py in this order, which is also the OpenAPI document's order (the routes below
# /api/organizations/ first). ``groups.users_groups_router`` is mounted separately, before the
# users router, so "groups" is not taken for a user id.
ALL_ROUTERS = (
    router,
    groups.organization_projects_router,
    invitations.organization_invitations_router,
    groups.projects_router,
    memberships.router,
    invitations.router,
    groups.groups_router,
)
