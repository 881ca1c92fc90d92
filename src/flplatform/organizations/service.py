"""Organisation tree, memberships, roles and invitations. Flushes, never commits.

Authorisation is the routers' job (through ``flplatform.permissions``); this module keeps the
structural invariants: fixed depth, membership rows at every level (a group member is a member
of the project), roles only at allowed levels, everything inside one organisation.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.auth.credentials import token_digest
from flplatform.errors import Conflict, NotFound, Unprocessable
from flplatform.kit.pagination import paginate
from flplatform.orm.base import utcnow
from flplatform.orm.organizations import (
    GROUP_KINDS,
    PARENT_KIND,
    ROLE_LEVELS,
    AdHocGroup,
    Collection,
    CollectionKind,
    Group,
    Invitation,
    Membership,
    Organization,
    OrganizationSettings,
    Project,
    Role,
    RoleKind,
)
from flplatform.orm.user import User

DEFAULT_PROJECT_NAME = "default"
_CLASSES: dict[CollectionKind, type[Collection]] = {
    CollectionKind.ORGANIZATION: Organization,
    CollectionKind.PROJECT: Project,
    CollectionKind.GROUP: Group,
    CollectionKind.ADHOC: AdHocGroup,
}

T = TypeVar("T")


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


async def create_organization(
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


async def default_project(session: AsyncSession, organization_id: uuid.UUID) -> Project:
    """The organisation's ``default`` project (DLR ``POST /api/groups/`` carries no project)."""
    stmt = (
        select(Project)
        .where(Project.organization_id == organization_id, Project.name == DEFAULT_PROJECT_NAME)
        .order_by(Project.created_at)
        .limit(1)
    )
    project = (await session.execute(stmt)).scalar_one_or_none()
    if project is None:
        org = await get_collection(session, organization_id, CollectionKind.ORGANIZATION)
        project = new_child(org, CollectionKind.PROJECT, DEFAULT_PROJECT_NAME)  # type: ignore[assignment]
        await save_collection(session, project)
    return project  # type: ignore[return-value]


async def list_collections(
    session: AsyncSession,
    where: Any,
    *,
    kinds: Sequence[CollectionKind],
    parent_id: uuid.UUID | None = None,
    limit: int,
    offset: int,
) -> tuple[Sequence[Collection], int]:
    stmt = select(Collection).where(Collection.kind.in_(list(kinds)), where)
    if parent_id is not None:
        stmt = stmt.where(Collection.parent_id == parent_id)
    return await paginate(
        session, stmt, order_by=(Collection.name, Collection.id), limit=limit, offset=offset
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
        # Topics outlive their owners (owner_id SET NULL) but not their organisation.
        from flplatform.orm.broker import BrokerTopic

        topics = BrokerTopic.__table__
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


async def update_settings(
    session: AsyncSession, settings: OrganizationSettings, changes: dict[str, Any]
) -> OrganizationSettings:
    for field, value in changes.items():
        if value is not None:
            setattr(settings, field, value)
    await session.flush()
    return settings


# ---------------------------------------------------------------------------- memberships


def _same_organization(collection: Collection, user: User) -> None:
    if user.organization_id != collection.organization_id:
        raise Unprocessable(
            f"User {user.id} is not in the organisation of {collection.kind.value} {collection.id}.",
            code="other_organization",
        )


async def _insert_once(session: AsyncSession, row: T, existing: Any) -> tuple[T, bool]:
    """Insert ``row`` unless ``existing`` finds it; a concurrent insert of the same row loses the
    unique-constraint race inside a savepoint and returns the winner's row."""
    found = (await session.execute(existing)).scalar_one_or_none()
    if found is not None:
        return found, False
    try:
        async with session.begin_nested():
            session.add(row)
            await session.flush()
    except IntegrityError:
        found = (await session.execute(existing)).scalar_one_or_none()
        if found is None:
            raise
        return found, False
    return row, True


async def add_member(session: AsyncSession, collection: Collection, user: User) -> tuple[Membership, bool]:
    """Kolibri's ``add_member``: the (possibly existing) membership and whether it was created.
    A group membership also writes the project's membership row (member of a child ⇒ member of
    the parent, materialised)."""
    if collection.kind == CollectionKind.ORGANIZATION:
        raise Unprocessable(
            "Organisation membership is the user's organization_id; add users to projects or groups.",
            code="organization_membership",
        )
    _same_organization(collection, user)
    if collection.kind in GROUP_KINDS:
        assert collection.parent_id is not None
        await _insert_once(
            session,
            Membership(user_id=user.id, collection_id=collection.parent_id),
            _membership_stmt(user.id, collection.parent_id),
        )
    return await _insert_once(
        session,
        Membership(user_id=user.id, collection_id=collection.id),
        _membership_stmt(user.id, collection.id),
    )


def _membership_stmt(user_id: uuid.UUID, collection_id: uuid.UUID) -> Any:
    return select(Membership).where(Membership.user_id == user_id, Membership.collection_id == collection_id)


async def remove_member(session: AsyncSession, collection: Collection, user_id: uuid.UUID) -> bool:
    """Kolibri's ``remove_member``: True if a membership was removed. Leaving a project also
    leaves its groups."""
    ids = [collection.id]
    if collection.kind == CollectionKind.PROJECT:
        ids += list(
            (
                await session.execute(select(Collection.id).where(Collection.parent_id == collection.id))
            ).scalars()
        )
    result = await session.execute(
        delete(Membership)
        .where(Membership.user_id == user_id, Membership.collection_id.in_(ids))
        .execution_options(synchronize_session=False)
    )
    await session.flush()
    return bool(result.rowcount)


async def list_members(
    session: AsyncSession, collection: Collection, *, limit: int, offset: int
) -> Sequence[User]:
    if collection.kind == CollectionKind.ORGANIZATION:
        stmt = select(User).where(User.organization_id == collection.id)
    else:
        stmt = (
            select(User)
            .join(Membership, Membership.user_id == User.id)
            .where(Membership.collection_id == collection.id)
        )
    return (await session.execute(stmt.order_by(User.username).limit(limit).offset(offset))).scalars().all()


async def member_collections(
    session: AsyncSession, user_id: uuid.UUID, kinds: Sequence[CollectionKind]
) -> Sequence[Collection]:
    stmt = (
        select(Collection)
        .join(Membership, Membership.collection_id == Collection.id)
        .where(Membership.user_id == user_id, Collection.kind.in_(list(kinds)))
        .order_by(Collection.name, Collection.id)
    )
    return (await session.execute(stmt)).scalars().all()


# ---------------------------------------------------------------------------- roles


async def add_role(
    session: AsyncSession, collection: Collection, user: User, kind: RoleKind
) -> tuple[Role, bool]:
    """Kolibri's ``add_role``: the (possibly existing) role and whether it was created."""
    _same_organization(collection, user)
    if collection.kind not in ROLE_LEVELS[kind]:
        allowed = ", ".join(sorted(k.value for k in ROLE_LEVELS[kind]))
        raise Unprocessable(f"A {kind.value} role can only be held on: {allowed}.", code="role_level")
    stmt = select(Role).where(Role.user_id == user.id, Role.collection_id == collection.id, Role.kind == kind)
    return await _insert_once(session, Role(user_id=user.id, collection_id=collection.id, kind=kind), stmt)


async def remove_role(
    session: AsyncSession, collection: Collection, user_id: uuid.UUID, kind: RoleKind
) -> bool:
    result = await session.execute(
        delete(Role)
        .where(Role.user_id == user_id, Role.collection_id == collection.id, Role.kind == kind)
        .execution_options(synchronize_session=False)
    )
    await session.flush()
    return bool(result.rowcount)


async def list_roles(session: AsyncSession, collection: Collection) -> Sequence[Role]:
    stmt = select(Role).where(Role.collection_id == collection.id).order_by(Role.created_at, Role.id)
    return (await session.execute(stmt)).scalars().all()


# ---------------------------------------------------------------------------- invitations


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


async def list_invitations(session: AsyncSession, organization_id: uuid.UUID) -> Sequence[Invitation]:
    stmt = (
        select(Invitation)
        .where(Invitation.organization_id == organization_id)
        .order_by(Invitation.created_at.desc())
    )
    return (await session.execute(stmt)).scalars().all()


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


async def load_with_settings(
    session: AsyncSession, org_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, OrganizationSettings]:
    rows = (
        await session.execute(
            select(OrganizationSettings).where(OrganizationSettings.organization_id.in_(list(org_ids)))
        )
    ).scalars()
    return {r.organization_id: r for r in rows}
