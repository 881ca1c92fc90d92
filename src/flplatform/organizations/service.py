"""The organisation tree: organisations, projects, groups and ad-hoc groups, and organisation
settings. Flushes, never commits.

Existing objects reach these functions already authorised (``organizations.dependencies``); the
functions taking a ``Requester`` check what only exists once the request body is known (a new
organisation, project or group) and filter lists with ``permissions.readable``. The structural
invariants are kept here: fixed depth, every collection inside one organisation. Memberships and
roles are in ``organizations.memberships``, invitation links in ``organizations.invitations``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import Conflict, Forbidden, NotFound, Unprocessable
from flplatform.kit.pagination import paginate
from flplatform.organizations.schemas import OrganizationCreate
from flplatform.orm.organizations import (
    PARENT_KIND,
    AdHocGroup,
    Collection,
    CollectionKind,
    Group,
    Organization,
    OrganizationSettings,
    Project,
    Role,
    RoleKind,
)
from flplatform.orm.user import User
from flplatform.permissions import Requester, can_read, ensure_allowed, ensure_readable, readable

DEFAULT_PROJECT_NAME = "default"
_CLASSES: dict[CollectionKind, type[Collection]] = {
    CollectionKind.ORGANIZATION: Organization,
    CollectionKind.PROJECT: Project,
    CollectionKind.GROUP: Group,
    CollectionKind.ADHOC: AdHocGroup,
}

# ---------------------------------------------------------------------------- collections


async def get_collection(
    session: AsyncSession, collection_id: uuid.UUID, *kinds: CollectionKind
) -> Collection:
    """The collection, or 404 if missing or of another kind."""
    found = await session.get(Collection, collection_id)
    if found is None or (kinds and found.kind not in kinds):
        label = kinds[0].value.capitalize() if len(kinds) == 1 else "Collection"
        raise NotFound(f"{label} {collection_id} not found.")
    return found


async def get_visible_collection(
    requester: Requester, collection_id: uuid.UUID, *kinds: CollectionKind
) -> Collection:
    """The collection if the caller can see it, else 404 (also for another kind)."""
    collection = await get_collection(requester.session, collection_id, *kinds)
    await ensure_readable(requester, collection, f"{collection.kind.value.capitalize()} {collection_id}")
    return collection


def collection_label(collection: Collection) -> str:
    """How refusals name a collection (``project <id>``)."""
    return f"{collection.kind.value} {collection.id}"


def new_organization(name: str) -> Organization:
    org_id = uuid.uuid4()
    return Organization(id=org_id, name=name, organization_id=org_id)


def new_child(parent: Collection, kind: CollectionKind, name: str) -> Collection:
    """An unsaved collection below ``parent`` (for ``can_create`` before it exists)."""
    if PARENT_KIND[kind] != parent.kind:
        raise Unprocessable(f"A {kind.value} cannot be placed below a {parent.kind.value}.")
    return _CLASSES[kind](
        id=uuid.uuid4(), name=name, parent_id=parent.id, organization_id=parent.organization_id
    )


async def save_organization(
    session: AsyncSession, org: Organization, settings: dict[str, Any], *, founder: User | None
) -> Organization:
    """Save ``org`` with its settings. A founder (a user outside every organisation, seed 004's
    ``create_team``) joins it and becomes its admin."""
    session.add(org)
    await session.flush()
    session.add(
        OrganizationSettings(organization_id=org.id, **{k: v for k, v in settings.items() if v is not None})
    )
    if founder is not None:
        founder.organization_id = org.id
        session.add(Role(user_id=founder.id, collection_id=org.id, kind=RoleKind.ADMIN))
    await session.flush()
    return org


async def save_collection(session: AsyncSession, collection: Collection) -> Collection:
    session.add(collection)
    await session.flush()
    return collection


async def create_organization(requester: Requester, data: OrganizationCreate) -> Organization:
    """A new organisation with its settings, if the caller may create one (superusers; a user
    outside every organisation founds one, joins it and becomes its admin)."""
    org = new_organization(data.name)
    await ensure_allowed(requester, "create", org, "an organisation")
    founder = requester.user if requester.is_unorganised else None
    await save_organization(requester.session, org, data.model_dump(exclude={"name"}), founder=founder)
    await requester.reload()  # a founder now holds the admin role
    return org


async def create_project(requester: Requester, organization: Collection, name: str) -> Collection:
    """A new project in the (visible) organisation, if the caller may create one."""
    project = new_child(organization, CollectionKind.PROJECT, name)
    await ensure_allowed(requester, "create", project, f"a project in organization {organization.id}")
    return await save_collection(requester.session, project)


async def create_group(
    requester: Requester, project: Collection, name: str, kind: CollectionKind
) -> Collection:
    """A new group or ad-hoc group in the (visible) project, if the caller may create one."""
    group = new_child(project, kind, name)
    await ensure_allowed(requester, "create", group, f"a group in project {project.id}")
    return await save_collection(requester.session, group)


async def project_for_new_group(requester: Requester, project_id: uuid.UUID | None) -> Collection:
    """Where DLR ``POST /api/groups/`` puts a group: the given (visible) project, else the
    caller's organisation's ``default`` project, which only its admins may use."""
    if project_id is not None:
        return await get_visible_collection(requester, project_id, CollectionKind.PROJECT)
    organization_id = requester.organization_id if requester.in_organization else None
    if organization_id is not None:
        if not requester.is_org_admin:
            raise Forbidden("Only organisation admins may create groups without a project_id.")
        return await default_project(requester.session, organization_id)
    if requester.is_superuser:
        raise NotFound("Superusers belong to no organisation: give a project_id.", code="project_required")
    raise Forbidden("Join or create an organisation before creating groups.", code="no_organization")


async def default_project(session: AsyncSession, organization_id: uuid.UUID) -> Collection:
    """The organisation's ``default`` project (DLR ``POST /api/groups/`` carries no project)."""
    stmt = (
        select(Project)
        .where(Project.organization_id == organization_id, Project.name == DEFAULT_PROJECT_NAME)
        .order_by(Project.created_at)
        .limit(1)
    )
    project: Collection | None = (await session.execute(stmt)).scalar_one_or_none()
    if project is None:
        org = await get_collection(session, organization_id, CollectionKind.ORGANIZATION)
        project = await save_collection(session, new_child(org, CollectionKind.PROJECT, DEFAULT_PROJECT_NAME))
    return project


async def list_collections(
    requester: Requester,
    kinds: Sequence[CollectionKind],
    *,
    parent_id: uuid.UUID | None = None,
    limit: int,
    offset: int,
) -> tuple[list[Collection], int]:
    """A page of the collections of ``kinds`` (below ``parent_id``) the caller can see, by name,
    and their total."""
    stmt = select(Collection).where(Collection.kind.in_(list(kinds)), readable(requester, Collection))
    if parent_id is not None:
        stmt = stmt.where(Collection.parent_id == parent_id)
    return await paginate(
        requester.session, stmt, order_by=(Collection.name, Collection.id), limit=limit, offset=offset
    )


async def rename_collection(session: AsyncSession, collection: Collection, name: str) -> Collection:
    collection.name = name
    await session.flush()
    return collection


async def delete_collection(session: AsyncSession, collection: Collection) -> None:
    """Deleting a collection deletes what is below it (and their memberships and roles). An
    organisation that still has users is refused: users are never deleted implicitly."""
    if collection.kind == CollectionKind.ORGANIZATION:
        users = (
            await session.execute(
                select(func.count()).select_from(User).where(User.organization_id == collection.id)
            )
        ).scalar_one()
        if users:
            raise Conflict(
                f"Organization {collection.id} still has {users} user(s); delete or move them first.",
                code="organization_not_empty",
            )
        from flplatform.orm.billing import Bill, LedgerAccount

        for column in (LedgerAccount.organization_id, Bill.organization_id):
            if (await session.execute(select(column).where(column == collection.id).limit(1))).first():
                raise Conflict(
                    f"Organization {collection.id} has billing history (accounts or bills), which is kept.",
                    code="organization_has_billing_history",
                )
        # Topics outlive their owners (owner_id SET NULL) but not their organisation.
        from flplatform.orm.broker import BrokerTopic

        topics = cast(Table, BrokerTopic.__table__)  # the base table: ResponseTopic rows cascade
        await session.execute(delete(topics).where(topics.c.organization_id == collection.id))
    await session.delete(collection)
    await session.flush()


async def get_settings(session: AsyncSession, organization_id: uuid.UUID) -> OrganizationSettings:
    found = await session.get(OrganizationSettings, organization_id)
    if found is None:  # organisations are created with settings; tolerate a missing row
        found = OrganizationSettings(organization_id=organization_id)
        session.add(found)
        await session.flush()
    return found


async def readable_settings(requester: Requester, organization: Collection) -> OrganizationSettings | None:
    """The organisation's settings if the caller may read them (shown with the organisation)."""
    settings = await get_settings(requester.session, organization.id)
    return settings if await can_read(requester, settings) else None


async def update_settings(
    session: AsyncSession, settings: OrganizationSettings, changes: dict[str, Any]
) -> OrganizationSettings:
    for field, value in changes.items():
        if value is not None:
            setattr(settings, field, value)
    await session.flush()
    return settings


async def load_with_settings(
    session: AsyncSession, org_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, OrganizationSettings]:
    rows = (
        await session.execute(
            select(OrganizationSettings).where(OrganizationSettings.organization_id.in_(list(org_ids)))
        )
    ).scalars()
    return {r.organization_id: r for r in rows}
