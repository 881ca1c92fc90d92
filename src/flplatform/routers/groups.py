"""Projects, groups and ad-hoc groups: an organisation's projects, a project's groups, and the DLR
wire-contract group routes (``/api/groups/``, ``/api/users/groups/``).

Permission checks are the dependencies of ``flplatform.organizations.dependencies``; creating a
project or group is checked by the service, which knows the new object's place.
"""

from __future__ import annotations

from fastapi import Response, status

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.errors import responses
from flplatform.kit.routing import APIRouter
from flplatform.kit.schemas import MAX_LIMIT, Limit, Offset
from flplatform.organizations import memberships, service
from flplatform.organizations.dependencies import (
    DeletableGroup,
    DeletableProject,
    ManagedGroup,
    ManagedProject,
    ReadableGroup,
    ReadableOrganization,
    ReadableProject,
)
from flplatform.organizations.schemas import (
    CollectionRead,
    CollectionUpdate,
    GroupCreate,
    GroupRead,
    ProjectCreate,
    ProjectGroupCreate,
)
from flplatform.orm.organizations import GROUP_KINDS, CollectionKind

TAG = "organizations"
organization_projects_router = APIRouter(prefix="/api/organizations", tags=[TAG])
projects_router = APIRouter(prefix="/api/projects", tags=[TAG])
groups_router = APIRouter(prefix="/api/groups", tags=["groups"])
# Mounted before the users router so "groups" is not taken for a user id.
users_groups_router = APIRouter(prefix="/api/users", tags=["groups"])


# ---------------------------------------------------------------------------- projects


@organization_projects_router.get(
    "/{organization_id}/projects/",
    response_model=list[CollectionRead],
    summary="List an organisation's projects",
    description="The projects the caller can see. `X-Total-Count` carries the total.",
    responses=responses(401, 404, 422),
)
async def list_projects(
    requester: AuthenticatedRequester,
    org: ReadableOrganization,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[CollectionRead]:
    rows, total = await service.list_collections(
        requester, [CollectionKind.PROJECT], parent_id=org.id, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return [CollectionRead.model_validate(r) for r in rows]


@organization_projects_router.post(
    "/{organization_id}/projects/",
    response_model=CollectionRead,
    status_code=status.HTTP_201_CREATED,
    summary="Create a project",
    description="Organisation admins and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def create_project(
    requester: AuthenticatedRequester, org: ReadableOrganization, data: ProjectCreate
) -> CollectionRead:
    return CollectionRead.model_validate(await service.create_project(requester, org, data.name))


@projects_router.get(
    "/{project_id}/",
    response_model=CollectionRead,
    summary="Get a project",
    responses=responses(401, 404, 422),
)
async def get_project(project: ReadableProject) -> CollectionRead:
    return CollectionRead.model_validate(project)


@projects_router.patch(
    "/{project_id}/",
    response_model=CollectionRead,
    summary="Rename a project",
    description="Organisation admins and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def update_project(
    requester: AuthenticatedRequester, project: ManagedProject, data: CollectionUpdate
) -> CollectionRead:
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
async def delete_project(requester: AuthenticatedRequester, project: DeletableProject) -> Response:
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
    project: ReadableProject,
    response: Response,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[GroupRead]:
    rows, total = await service.list_collections(
        requester, GROUP_KINDS, parent_id=project.id, limit=limit, offset=offset
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
    requester: AuthenticatedRequester, project: ReadableProject, data: ProjectGroupCreate
) -> GroupRead:
    group = await service.create_group(requester, project, data.name, CollectionKind(data.kind))
    return GroupRead.model_validate(group)


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
    rows, total = await service.list_collections(requester, GROUP_KINDS, limit=limit, offset=offset)
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
    project = await service.project_for_new_group(requester, data.project_id)
    group = await service.create_group(requester, project, data.name, CollectionKind(data.kind))
    return GroupRead.model_validate(group)


@groups_router.get(
    "/{group_id}/", response_model=GroupRead, summary="Get a group", responses=responses(401, 404, 422)
)
async def get_group(group: ReadableGroup) -> GroupRead:
    return GroupRead.model_validate(group)


@groups_router.put(
    "/{group_id}/",
    response_model=GroupRead,
    summary="Rename a group",
    description="Organisation admins, coaches of the group's project and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def put_group(
    requester: AuthenticatedRequester, group: ManagedGroup, data: CollectionUpdate
) -> GroupRead:
    return GroupRead.model_validate(await service.rename_collection(requester.session, group, data.name))


@groups_router.patch(
    "/{group_id}/",
    response_model=GroupRead,
    summary="Rename a group (same as PUT)",
    responses=responses(401, 403, 404, 422),
)
async def patch_group(
    requester: AuthenticatedRequester, group: ManagedGroup, data: CollectionUpdate
) -> GroupRead:
    return GroupRead.model_validate(await service.rename_collection(requester.session, group, data.name))


@groups_router.delete(
    "/{group_id}/",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a group",
    description="Organisation admins, coaches of the group's project and superusers.",
    responses=responses(401, 403, 404, 422),
)
async def delete_group(requester: AuthenticatedRequester, group: DeletableGroup) -> Response:
    await service.delete_collection(requester.session, group)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@users_groups_router.get(
    "/groups/",
    response_model=list[GroupRead],
    summary="My groups",
    description="DLR wire contract: the groups (and ad-hoc groups) the caller is a member of, by name; "
    "`limit`/`offset` page them (the default page holds the most a page may) and `X-Total-Count` carries "
    "the total.",
    responses=responses(401, 422),
)
async def my_groups(
    requester: AuthenticatedRequester, response: Response, limit: Limit = MAX_LIMIT, offset: Offset = 0
) -> list[GroupRead]:
    rows, total = await memberships.member_collections(
        requester.session, requester.authenticated_user.id, GROUP_KINDS, limit=limit, offset=offset
    )
    response.headers["X-Total-Count"] = str(total)
    return [GroupRead.model_validate(r) for r in rows]
