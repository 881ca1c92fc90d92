"""Who asks: the authenticated user with their roles and memberships, loaded once per request
(``auth.dependencies.RequesterDep``/``AuthenticatedRequester`` are its FastAPI dependencies).

Loading the requester's role and membership rows up front (one indexed query, a handful of rows)
lets most boolean checks be decided in Python from the object's own columns, Kolibri-style
(``RoleBasedPermissions`` first loads the requester's roles too). The SQL ``readable`` clauses do
not depend on this snapshot: they use subqueries on the same tables, so they stay correct when
composed or nested, and the property test checks that both answers agree.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import String, literal, select, type_coerce, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import Unauthorized
from flplatform.orm.organizations import Collection, Membership, OrganizationSettings, Role, RoleKind
from flplatform.orm.user import User

ANY_ROLE: frozenset[RoleKind] = frozenset(RoleKind)
_MEMBER = "member"


@dataclass
class Requester:
    """The subject of every permission check (``None`` user: anonymous)."""

    session: AsyncSession
    user: User | None
    roles: frozenset[tuple[uuid.UUID, RoleKind]] = frozenset()
    memberships: frozenset[uuid.UUID] = frozenset()
    _settings: OrganizationSettings | None = field(default=None, repr=False)

    @classmethod
    async def load(cls, session: AsyncSession, user: User | None) -> Requester:
        requester = cls(session=session, user=user)
        await requester.reload()
        return requester

    async def reload(self) -> None:
        """Re-read roles and memberships (after this request changed them)."""
        self._settings = None
        if self.user is None or self.user.is_superuser or self.user.organization_id is None:
            # Superusers pass every check; users outside organisations cannot hold roles.
            self.roles, self.memberships = frozenset(), frozenset()
            return
        uid = self.user.id
        rows = (
            await self.session.execute(
                union_all(
                    select(Role.collection_id, type_coerce(Role.kind, String)).where(Role.user_id == uid),
                    select(Membership.collection_id, literal(_MEMBER)).where(Membership.user_id == uid),
                )
            )
        ).all()
        self.roles = frozenset((cid, RoleKind(kind)) for cid, kind in rows if kind != _MEMBER)
        self.memberships = frozenset(cid for cid, kind in rows if kind == _MEMBER)

    # ------------------------------------------------------------------ identity

    @property
    def is_anonymous(self) -> bool:
        return self.user is None

    @property
    def is_superuser(self) -> bool:
        return self.user is not None and self.user.is_superuser

    @property
    def authenticated_user(self) -> User:
        """The calling user; 401 for an anonymous caller (never reached behind
        ``AuthenticatedRequester``, which refuses them first)."""
        if self.user is None:
            raise Unauthorized()
        return self.user

    @property
    def id(self) -> uuid.UUID | None:
        return self.user.id if self.user is not None else None

    @property
    def organization_id(self) -> uuid.UUID | None:
        return self.user.organization_id if self.user is not None else None

    @property
    def in_organization(self) -> bool:
        """An authenticated, non-superuser user of an organisation."""
        return self.user is not None and not self.user.is_superuser and self.user.organization_id is not None

    @property
    def is_unorganised(self) -> bool:
        """An authenticated non-superuser outside every organisation (the DLR-compatible space)."""
        return self.user is not None and not self.user.is_superuser and self.user.organization_id is None

    # ------------------------------------------------------------------ roles (pure Python)

    def role_collection_ids(self, kinds: Iterable[RoleKind] = ANY_ROLE) -> frozenset[uuid.UUID]:
        wanted = frozenset(kinds)
        return frozenset(cid for cid, kind in self.roles if kind in wanted)

    def has_org_role(self, kinds: Iterable[RoleKind] = ANY_ROLE) -> bool:
        """A role on the requester's whole organisation (applies to everything in it)."""
        return self.in_organization and self.organization_id in self.role_collection_ids(kinds)

    @property
    def is_org_admin(self) -> bool:
        return self.has_org_role((RoleKind.ADMIN,))

    def has_role_for_collection(self, kinds: Iterable[RoleKind], collection: Collection) -> bool:
        """Kolibri's ``has_role_for_collection``: a role of ``kinds`` on the collection or an
        ancestor, inside the requester's organisation. Superusers hold every role."""
        if self.is_superuser:
            return True
        if not self.in_organization or collection.organization_id != self.organization_id:
            return False
        return not self.role_collection_ids(kinds).isdisjoint(collection.ancestor_ids)

    def has_role_on_ids(
        self,
        kinds: Iterable[RoleKind],
        organization_id: uuid.UUID | None,
        collection_ids: Iterable[uuid.UUID | None],
    ) -> bool:
        if self.is_superuser:
            return True
        if not self.in_organization or organization_id != self.organization_id:
            return False
        return not self.role_collection_ids(kinds).isdisjoint(i for i in collection_ids if i is not None)

    def is_member_of(self, collection: Collection) -> bool:
        if not self.in_organization or collection.organization_id != self.organization_id:
            return False
        return collection.id == self.organization_id or collection.id in self.memberships

    async def organization_settings(self) -> OrganizationSettings | None:
        if self.organization_id is None:
            return None
        if self._settings is None:
            self._settings = await self.session.get(OrganizationSettings, self.organization_id)
        return self._settings
