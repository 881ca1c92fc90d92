"""Memberships and roles inside the organisation tree (Kolibri's ``add_member``/``add_role``).
Flushes, never commits.

Structural invariants live here: a group member is a member of the project too (the row is
materialised), roles only at their allowed levels, everyone inside one organisation. The
functions taking a requester (``grant_membership``, ``grant_role``, ``visible_members``,
``readable_roles``) also apply ``flplatform.permissions``; the others trust their caller.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import NotFound, Unprocessable
from flplatform.kit.pagination import page, paginate
from flplatform.organizations.service import collection_label
from flplatform.orm.organizations import (
    GROUP_KINDS,
    ROLE_LEVELS,
    Collection,
    CollectionKind,
    Membership,
    Role,
    RoleKind,
)
from flplatform.orm.user import User
from flplatform.permissions import MembershipDraft, Requester, RoleDraft, ensure_allowed, readable

T = TypeVar("T")


async def organization_user(session: AsyncSession, collection: Collection, user_id: uuid.UUID) -> User:
    """A user of the collection's organisation; users elsewhere are 404 (never revealed)."""
    user = await session.get(User, user_id)
    if user is None or user.organization_id != collection.organization_id:
        raise NotFound(f"User {user_id} not found.")
    return user


def _rowcount(result: Any) -> int:
    """Rows a DML statement touched (``Session.execute`` is typed as returning a plain ``Result``)."""
    return cast(CursorResult[Any], result).rowcount


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
    return bool(_rowcount(result))


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
    return await page(session, stmt, order_by=(User.username,), limit=limit, offset=offset)


async def member_collections(
    session: AsyncSession, user_id: uuid.UUID, kinds: Sequence[CollectionKind], *, limit: int, offset: int
) -> tuple[list[Collection], int]:
    """A page of the collections of ``kinds`` the user is a member of, by name, and their total."""
    return await paginate(
        session,
        select(Collection)
        .join(Membership, Membership.collection_id == Collection.id)
        .where(Membership.user_id == user_id, Collection.kind.in_(list(kinds))),
        order_by=(Collection.name, Collection.id),
        limit=limit,
        offset=offset,
    )


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
    return bool(_rowcount(result))


# ---------------------------------------------------------------------------- with permissions


async def grant_membership(
    requester: Requester, collection: Collection, user_id: uuid.UUID
) -> tuple[Membership, bool]:
    """``add_member`` if the caller may add ``user_id`` to the (visible) collection, else 403."""
    user = await organization_user(requester.session, collection, user_id)
    draft = MembershipDraft(collection=collection, user_id=user.id, user_organization_id=user.organization_id)
    await ensure_allowed(requester, "create", draft, f"members of {collection_label(collection)}")
    return await add_member(requester.session, collection, user)


async def grant_role(
    requester: Requester, collection: Collection, user_id: uuid.UUID, kind: RoleKind
) -> tuple[Role, bool]:
    """``add_role`` if the caller may grant it on the (visible) collection, else 403."""
    user = await organization_user(requester.session, collection, user_id)
    draft = RoleDraft(
        collection=collection, user_id=user.id, user_organization_id=user.organization_id, kind=kind
    )
    await ensure_allowed(requester, "create", draft, f"roles on {collection_label(collection)}")
    return await add_role(requester.session, collection, user, kind)


async def visible_members(
    requester: Requester, collection: Collection, *, limit: int, offset: int
) -> list[User]:
    """The page of the collection's members, less those the caller may not see."""
    users = await list_members(requester.session, collection, limit=limit, offset=offset)
    visible_ids = set(
        await requester.session.scalars(
            select(User.id).where(User.id.in_([u.id for u in users]), readable(requester, User))
        )
    )
    return [u for u in users if u.id in visible_ids]


async def readable_roles(
    requester: Requester, collection: Collection, *, limit: int, offset: int
) -> tuple[list[Role], int]:
    """A page of the roles held on the collection that the caller can see (their own; all for
    admins), oldest first, and their total."""
    return await paginate(
        requester.session,
        select(Role).where(Role.collection_id == collection.id, readable(requester, Role)),
        order_by=(Role.created_at, Role.id),
        limit=limit,
        offset=offset,
    )
