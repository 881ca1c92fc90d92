"""Policies for the organisation tree, memberships, roles, invitations and users.

Every SQL clause is a handful of indexed ``IN (SELECT …)`` look-ups on ``roles`` (by
``uq_roles_user_id_collection_id_kind``) and ``memberships`` (by
``uq_memberships_user_id_collection_id`` / ``ix_memberships_collection_id``), always AND-ed with
the requester's organisation so nothing crosses tenants. Because membership rows exist at every
level and every collection stores its ancestors (``parent_id``, ``organization_id``), no clause
recurses and none grows with the number of rows listed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, false, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from flplatform.orm.organizations import (
    PARENT_KIND,
    ROLE_LEVELS,
    Collection,
    CollectionKind,
    Invitation,
    Membership,
    OrganizationSettings,
    Role,
    RoleKind,
)
from flplatform.orm.user import User
from flplatform.permissions.base import Clause, Policy, Superuser
from flplatform.permissions.requester import ANY_ROLE, Requester

ADMIN = (RoleKind.ADMIN,)
MANAGERS = (RoleKind.ADMIN, RoleKind.COACH)


@dataclass(frozen=True)
class MembershipDraft:
    """A membership to create or delete, as the policy needs it (no row yet)."""

    collection: Collection
    user_id: uuid.UUID
    user_organization_id: uuid.UUID | None


@dataclass(frozen=True)
class RoleDraft:
    collection: Collection
    user_id: uuid.UUID
    user_organization_id: uuid.UUID | None
    kind: RoleKind


# ---------------------------------------------------------------------------- SQL building blocks


def role_collections(requester: Requester, kinds: Iterable[RoleKind] = ANY_ROLE) -> Any:
    """``SELECT collection_id FROM roles WHERE user_id = :me AND kind IN :kinds``."""
    return select(Role.collection_id).where(Role.user_id == requester.id, Role.kind.in_(list(kinds)))


def has_role_clause(requester: Requester, kinds: Iterable[RoleKind], *ancestor_columns: Any) -> Clause:
    """A role of ``kinds`` on any of the given ancestor-id columns (the collection itself, its
    parent, its organisation)."""
    sub = role_collections(requester, kinds)
    return or_(*(column.in_(sub) for column in ancestor_columns))


def has_org_role_clause(requester: Requester, kinds: Iterable[RoleKind] = ANY_ROLE) -> Clause:
    """An uncorrelated EXISTS: the database evaluates it once per statement."""
    return exists(
        select(Role.id).where(
            Role.user_id == requester.id,
            Role.collection_id == requester.organization_id,
            Role.kind.in_(list(kinds)),
        )
    )


def in_my_organization(requester: Requester, column: InstrumentedAttribute[Any]) -> Clause:
    return column == requester.organization_id


def managed_collections(requester: Requester, kinds: Iterable[RoleKind] = ANY_ROLE) -> Any:
    """Ids of the collections of my organisation on which I hold (inherited) ``kinds``."""
    kinds = list(kinds)
    return select(Collection.id).where(
        Collection.organization_id == requester.organization_id,
        has_role_clause(requester, kinds, Collection.id, Collection.parent_id, Collection.organization_id),
    )


async def user_is_member(
    requester: Requester, user_id: uuid.UUID, collection_ids: Iterable[uuid.UUID | None]
) -> bool:
    """One indexed EXISTS on memberships (``None`` ids, absent parents, are skipped)."""
    ids = [i for i in collection_ids if i is not None]
    if not ids:
        return False
    stmt = select(
        exists(select(Membership.id).where(Membership.user_id == user_id, Membership.collection_id.in_(ids)))
    )
    return bool((await requester.session.execute(stmt)).scalar())


# ---------------------------------------------------------------------------- role look-ups


async def has_role_for_user(requester: Requester, kinds: Iterable[RoleKind], user: User) -> bool:
    """Kolibri's ``has_role_for_user``: a role of ``kinds`` on the user's organisation or on a
    collection the user is a member of. In the organisation-less (DLR-compatible) space every user
    may act for every other organisation-less user, as in the reference server."""
    return not await users_without_role(requester, kinds, [user])


async def users_without_role(
    requester: Requester, kinds: Iterable[RoleKind], users: Iterable[User]
) -> list[User]:
    """The users among ``users`` the requester holds no role of ``kinds`` for — one query for all
    of them (training creation checks every participant this way)."""
    users = list(users)
    if requester.is_superuser:
        return []
    if requester.is_anonymous:
        return users
    if requester.is_unorganised:
        return [u for u in users if u.organization_id is not None]
    kinds = list(kinds)
    mine = [u for u in users if u.organization_id == requester.organization_id]
    missing = [u for u in users if u.organization_id != requester.organization_id]
    if not mine or requester.has_org_role(kinds):
        return missing
    coached = requester.role_collection_ids(kinds)
    if not coached:
        return missing + mine
    rows = await requester.session.execute(
        select(Membership.user_id)
        .where(Membership.user_id.in_([u.id for u in mine]), Membership.collection_id.in_(list(coached)))
        .distinct()
    )
    covered = set(rows.scalars())
    return missing + [u for u in mine if u.id not in covered]


# ---------------------------------------------------------------------------- collections


class CollectionRules(Policy):
    """Organisations, projects, groups, ad-hoc groups.

    * read: every user of the organisation reads the organisation; a role on the collection or an
      ancestor, or a membership row, reads the collection.
    * create: an organisation - a superuser, or a user outside every organisation (who becomes its
      admin, seed 004's ``create_team``); a project - an admin; a group - an admin or a coach of
      the project (Kolibri's ``CoachesCanManageGroupsForTheirClasses``).
    * update/delete: an organisation - its admin (delete: superusers only); a project - an admin;
      a group - an admin or a coach of its project.
    """

    model = Collection

    async def can_read(self, requester: Requester, obj: Collection) -> bool:
        if not requester.in_organization or obj.organization_id != requester.organization_id:
            return False
        return (
            obj.id == requester.organization_id
            or requester.has_role_for_collection(ANY_ROLE, obj)
            or obj.id in requester.memberships
        )

    def readable(self, requester: Requester) -> Clause:
        if not requester.in_organization:
            return false()
        return and_(
            Collection.organization_id == requester.organization_id,
            or_(
                Collection.id == requester.organization_id,
                has_role_clause(
                    requester, ANY_ROLE, Collection.id, Collection.parent_id, Collection.organization_id
                ),
                Collection.id.in_(select(Membership.collection_id).where(Membership.user_id == requester.id)),
            ),
        )

    @staticmethod
    def _manage_ids(obj: Collection) -> tuple[uuid.UUID | None, ...]:
        """Where a role must be held to create, rename or delete ``obj``: on its parent or above
        (a coach of a group does not manage the group itself, only its memberships)."""
        return (obj.parent_id, obj.organization_id)

    async def can_create(self, requester: Requester, obj: Collection) -> bool:
        if obj.kind == CollectionKind.ORGANIZATION:
            return requester.is_unorganised
        kinds = ADMIN if obj.kind == CollectionKind.PROJECT else MANAGERS
        return requester.has_role_on_ids(kinds, obj.organization_id, self._manage_ids(obj))

    async def can_update(self, requester: Requester, obj: Collection) -> bool:
        if obj.kind == CollectionKind.ORGANIZATION:
            return requester.has_role_on_ids(ADMIN, obj.organization_id, (obj.id,))
        return await self.can_create(requester, obj)

    async def can_delete(self, requester: Requester, obj: Collection) -> bool:
        if obj.kind == CollectionKind.ORGANIZATION:
            return False  # superusers only (via the Superuser part)
        return await self.can_create(requester, obj)


class SettingsRules(Policy):
    """An organisation's settings: its users read them, its admins change them."""

    model = OrganizationSettings

    async def can_read(self, requester: Requester, obj: OrganizationSettings) -> bool:
        return requester.in_organization and obj.organization_id == requester.organization_id

    async def can_update(self, requester: Requester, obj: OrganizationSettings) -> bool:
        return requester.has_role_on_ids(ADMIN, obj.organization_id, (obj.organization_id,))

    def readable(self, requester: Requester) -> Clause:
        if not requester.in_organization:
            return false()
        return OrganizationSettings.organization_id == requester.organization_id


# ---------------------------------------------------------------------------- memberships and roles


class MembershipRules(Policy):
    """A membership is read by its user and by anyone with a role on its collection (or above);
    created and deleted by admins and coaches with a role on the collection (Kolibri's
    ``CoachesCanManageMembershipsForTheirGroups``). A coach of only a group may add a user to it
    only if the user is already a member of the group's project. ``obj.collection`` must be loaded;
    for creation ``obj.user`` too (or pass ``user_organization_id`` via ``MembershipDraft``)."""

    model = Membership

    async def can_read(self, requester: Requester, obj: Membership) -> bool:
        return obj.user_id == requester.id or (
            requester.in_organization and requester.has_role_for_collection(ANY_ROLE, obj.collection)
        )

    def readable(self, requester: Requester) -> Clause:
        own = Membership.user_id == requester.id if requester.id is not None else false()
        if not requester.in_organization:
            return own
        return or_(own, Membership.collection_id.in_(managed_collections(requester)))

    async def can_create(self, requester: Requester, obj: Any) -> bool:
        collection: Collection = obj.collection
        if (
            collection.kind == CollectionKind.ORGANIZATION
            or obj.user_organization_id != collection.organization_id
        ):
            return False  # organisation membership is users.organization_id, never a row
        if not requester.has_role_for_collection(ANY_ROLE, collection):
            return False
        if collection.kind in (CollectionKind.GROUP, CollectionKind.ADHOC) and not requester.has_role_on_ids(
            ANY_ROLE, collection.organization_id, (collection.parent_id, collection.organization_id)
        ):
            return await user_is_member(requester, obj.user_id, [collection.parent_id])
        return True

    async def can_delete(self, requester: Requester, obj: Any) -> bool:
        return requester.in_organization and requester.has_role_for_collection(ANY_ROLE, obj.collection)


class RoleRules(Policy):
    """Roles are read by their holder and by the organisation's admins; only admins (and
    superusers) grant and revoke them, to users of the same organisation, at allowed levels."""

    model = Role

    async def can_read(self, requester: Requester, obj: Role) -> bool:
        return obj.user_id == requester.id or requester.has_role_on_ids(
            ADMIN, obj.collection.organization_id, (obj.collection.organization_id,)
        )

    def readable(self, requester: Requester) -> Clause:
        own = Role.user_id == requester.id if requester.id is not None else false()
        if not requester.in_organization:
            return own
        admin_of = select(Collection.id).where(
            Collection.organization_id == requester.organization_id,
            Collection.organization_id.in_(role_collections(requester, ADMIN)),
        )
        return or_(own, Role.collection_id.in_(admin_of))

    async def can_create(self, requester: Requester, obj: Any) -> bool:
        collection: Collection = obj.collection
        if obj.user_organization_id != collection.organization_id:
            return False
        if collection.kind not in ROLE_LEVELS[RoleKind(obj.kind)]:
            return False
        return requester.has_role_on_ids(ADMIN, collection.organization_id, (collection.organization_id,))

    async def can_delete(self, requester: Requester, obj: Any) -> bool:
        return requester.has_role_on_ids(
            ADMIN, obj.collection.organization_id, (obj.collection.organization_id,)
        )


class InvitationRules(Policy):
    """Invitation links are made, listed and revoked by the organisation's admins."""

    model = Invitation

    async def _admin(self, requester: Requester, obj: Invitation) -> bool:
        return requester.has_role_on_ids(ADMIN, obj.organization_id, (obj.organization_id,))

    can_create = can_read = can_update = can_delete = _admin

    def readable(self, requester: Requester) -> Clause:
        if not requester.in_organization:
            return false()
        return and_(
            Invitation.organization_id == requester.organization_id,
            Invitation.organization_id.in_(role_collections(requester, ADMIN)),
        )


# ---------------------------------------------------------------------------- users


class UserRules(Policy):
    """Users.

    * read: themselves; in an organisation, its admins and organisation coaches read every user
      of it, other coaches the members of the collections they coach (explicit membership rows
      make this one look-up). Outside organisations (the DLR-compatible space) users read each
      other, as in the reference server, except superusers (platform operators are not members
      of that space: their accounts and addresses are nobody's business there); the user routes
      also leave out other users' email and notification endpoint there.
    * create: admins create users in their organisation (anonymous sign-up goes through an
      invitation link or ``FLP_ALLOW_SELF_REGISTRATION``, decided by the route).
    * update: themselves (within the organisation's ``members_can_edit_*`` switches, checked by
      the user routes) and their organisation's admins.
    * delete: their organisation's admins; themselves where the organisation allows it
      (``members_can_delete_account``; always outside organisations). Superusers never delete
      themselves.
    """

    model = User

    async def can_read(self, requester: Requester, obj: User) -> bool:
        if requester.is_anonymous:
            return False
        if obj.id == requester.id:
            return True
        if requester.is_unorganised:
            return obj.organization_id is None and not obj.is_superuser
        if not requester.in_organization or obj.organization_id != requester.organization_id:
            return False
        if requester.has_org_role():
            return True
        return await user_is_member(requester, obj.id, requester.role_collection_ids())

    def readable(self, requester: Requester) -> Clause:
        if requester.is_anonymous:
            return false()
        if requester.is_unorganised:
            return and_(User.organization_id.is_(None), User.is_superuser.is_(False))
        if not requester.in_organization:
            return User.id == requester.id
        coached_members = select(Membership.user_id).where(
            Membership.collection_id.in_(role_collections(requester, ANY_ROLE))
        )
        return and_(
            User.organization_id == requester.organization_id,
            or_(User.id == requester.id, has_org_role_clause(requester), User.id.in_(coached_members)),
        )

    async def can_create(self, requester: Requester, obj: User) -> bool:
        return requester.has_role_on_ids(ADMIN, obj.organization_id, (obj.organization_id,))

    async def can_update(self, requester: Requester, obj: User) -> bool:
        if obj.id == requester.id:
            return True
        return (
            not obj.is_superuser
            and requester.in_organization
            and requester.has_role_on_ids(ADMIN, obj.organization_id, (obj.organization_id,))
        )

    async def can_delete(self, requester: Requester, obj: User) -> bool:
        if requester.is_anonymous:
            return False
        if obj.id == requester.id:
            if requester.is_superuser:
                return False
            settings = await requester.organization_settings()
            return settings is None or settings.members_can_delete_account
        if requester.is_superuser:
            return True
        return (
            not obj.is_superuser
            and requester.in_organization
            and requester.has_role_on_ids(ADMIN, obj.organization_id, (obj.organization_id,))
        )


class _SuperuserExceptSelfDelete(Superuser):
    async def can_delete(self, requester: Requester, obj: Any) -> bool:
        return requester.is_superuser and getattr(obj, "id", None) != requester.id


COLLECTION_POLICY = Superuser() | CollectionRules()
SETTINGS_POLICY = Superuser() | SettingsRules()
MEMBERSHIP_POLICY = Superuser() | MembershipRules()
ROLE_POLICY = Superuser() | RoleRules()
INVITATION_POLICY = Superuser() | InvitationRules()
# The superuser part must not allow self-deletion, so UserRules decides deletes alone.
USER_POLICY = _SuperuserExceptSelfDelete() | UserRules()

assert set(PARENT_KIND) == set(CollectionKind)


# ---------------------------------------------------------------------------- organisation switches

# Which organisation switch governs a user's changes to their own fields (seed 003's
# FacilityDataset ``learner_can_edit_*``).
SELF_EDIT_SWITCHES: dict[str, str] = {
    "username": "members_can_edit_username",
    "first_name": "members_can_edit_name",
    "last_name": "members_can_edit_name",
    "password": "members_can_edit_password",
}


async def refused_self_edits(requester: Requester, target: User, fields: Iterable[str]) -> list[str]:
    """The fields a member may not change on their own user under their organisation's settings.
    Admins of the organisation, superusers and users outside organisations are not restricted."""
    if target.id != requester.id or not requester.in_organization or requester.is_org_admin:
        return []
    settings = await requester.organization_settings()
    if settings is None:
        return []
    return sorted(
        f for f in fields if f in SELF_EDIT_SWITCHES and not getattr(settings, SELF_EDIT_SWITCHES[f])
    )
