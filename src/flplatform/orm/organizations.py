"""Organisations, projects, groups and ad-hoc groups; memberships, roles, invitation links and
organisation settings (seed 003: Kolibri's auth app; seed 004: EasyAutoML teams and links).

Storage decisions (see ``docs/performance.md`` § Permissions for the measurements):

* **One ``collections`` table with a ``kind`` (single-table inheritance), not joined tables.**
  Every level has the same columns (name, parent), memberships and roles need *one* foreign-key
  target, and the policy layer asks questions across levels ("any role on this collection or an
  ancestor") that would otherwise join three tables. What differs per level - the organisation's
  settings - lives in its own 1:1 table ``organization_settings``.
* **Fixed depth with denormalised ancestors, not a tree walk.** The hierarchy is fixed:
  ``Organization > Project > Group | AdHocGroup``. Each row stores ``parent_id`` *and*
  ``organization_id`` (an organisation points at itself), so the ancestors of any collection are
  the constant set ``{id, parent_id, organization_id}``: no recursive CTE, no path ``LIKE``.
* **Memberships are explicit rows at each level** (Kolibri generation 2, PR #7928): a member of a
  group also has a row for the group's project, written in the same transaction by the service;
  removing the project row removes the group rows. Membership of the organisation is
  ``users.organization_id``. "Is U a member of C" and "which users does coach X see" are then
  single indexed look-ups (``uq_memberships_user_id_collection_id`` and
  ``ix_memberships_collection_id``), where a materialised path would need a prefix ``LIKE`` join
  (which PostgreSQL indexes only with ``text_pattern_ops``) and a CTE one recursion per check.
* **Roles** (``admin`` on an organisation; ``coach`` on any level) apply to every collection
  below: a role check is ``EXISTS(roles WHERE user_id = :me AND collection_id IN (:id,
  :parent_id, :organization_id))``, served by ``uq_roles_user_id_collection_id_kind``.
* **Invitation links** store only a keyed digest of their random token (like API tokens), expire,
  can be revoked and optionally be limited in uses.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from flplatform.orm.base import Base, IDMixin, TimestampMixin, str_enum, utcnow


class CollectionKind(enum.StrEnum):
    ORGANIZATION = "organization"
    PROJECT = "project"
    GROUP = "group"
    ADHOC = "adhoc"


class RoleKind(enum.StrEnum):
    ADMIN = "admin"
    COACH = "coach"


# Which collection kind may be the parent of which (None: a root).
PARENT_KIND: dict[CollectionKind, CollectionKind | None] = {
    CollectionKind.ORGANIZATION: None,
    CollectionKind.PROJECT: CollectionKind.ORGANIZATION,
    CollectionKind.GROUP: CollectionKind.PROJECT,
    CollectionKind.ADHOC: CollectionKind.PROJECT,
}

# Where each role kind may be held: admins administer a whole organisation; coaches may coach
# an organisation (all its projects), a project (its groups) or a single group.
ROLE_LEVELS: dict[RoleKind, frozenset[CollectionKind]] = {
    RoleKind.ADMIN: frozenset({CollectionKind.ORGANIZATION}),
    RoleKind.COACH: frozenset(CollectionKind),
}


class Collection(IDMixin, TimestampMixin, Base):
    __tablename__ = "collections"
    __table_args__ = (
        CheckConstraint(
            "(kind = 'organization' AND parent_id IS NULL) OR (kind <> 'organization' AND parent_id IS NOT NULL)",
            name="root_is_organization",
        ),
        Index("ix_collections_organization_id_kind", "organization_id", "kind"),
    )

    kind: Mapped[CollectionKind] = mapped_column(str_enum(CollectionKind, "collection_kind"))
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), index=True
    )
    # The tenant: an organisation's own id for organisations, the root's id below.
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))

    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_abstract": True}

    @property
    def ancestor_ids(self) -> frozenset[uuid.UUID]:
        """This collection and every collection above it (roles there apply here)."""
        return frozenset(i for i in (self.id, self.parent_id, self.organization_id) if i is not None)


class Organization(Collection):
    """≈ Kolibri's Facility, ≈ EasyAutoML's Team: the tenant. Its settings are the 1:1
    ``OrganizationSettings`` row (deleted with it by the database)."""

    __mapper_args__ = {"polymorphic_identity": CollectionKind.ORGANIZATION}


class Project(Collection):
    """≈ Kolibri's Classroom: a federation of clients working on one problem."""

    __mapper_args__ = {"polymorphic_identity": CollectionKind.PROJECT}


class Group(Collection):
    """≈ Kolibri's LearnerGroup: a group of clients in a project (the DLR ``/api/groups/``)."""

    __mapper_args__ = {"polymorphic_identity": CollectionKind.GROUP}


class AdHocGroup(Collection):
    """A group made for one training (≈ Kolibri's AdHocGroup for one lesson or exam)."""

    __mapper_args__ = {"polymorphic_identity": CollectionKind.ADHOC}


GROUP_KINDS = (CollectionKind.GROUP, CollectionKind.ADHOC)


class OrganizationSettings(Base):
    """Seed 003's FacilityDataset: description, location and what members may do themselves.
    Organisation admins and superusers are not bound by the ``members_can_*`` switches."""

    __tablename__ = "organization_settings"

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True
    )
    description: Mapped[str] = mapped_column(Text, default="")
    location: Mapped[str] = mapped_column(String(200), default="")
    members_can_edit_username: Mapped[bool] = mapped_column(Boolean, default=True)
    members_can_edit_name: Mapped[bool] = mapped_column(Boolean, default=True)
    members_can_edit_password: Mapped[bool] = mapped_column(Boolean, default=True)
    members_can_sign_up: Mapped[bool] = mapped_column(Boolean, default=True)
    members_can_delete_account: Mapped[bool] = mapped_column(Boolean, default=False)


class Membership(IDMixin, Base):
    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("user_id", "collection_id"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    collection: Mapped[Collection] = relationship(lazy="raise")


class Role(IDMixin, Base):
    __tablename__ = "roles"
    __table_args__ = (UniqueConstraint("user_id", "collection_id", "kind"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[RoleKind] = mapped_column(str_enum(RoleKind, "role_kind"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    collection: Mapped[Collection] = relationship(lazy="raise")


class Invitation(IDMixin, Base):
    """A link that lets a user join an organisation as a member (seed 004's ``generate_link``)."""

    __tablename__ = "invitations"

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), index=True
    )
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    note: Mapped[str] = mapped_column(String(200), default="")
    created_by_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column()
    revoked_at: Mapped[dt.datetime | None]
    max_uses: Mapped[int | None] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)

    def is_usable(self, now: dt.datetime) -> bool:
        return (
            self.revoked_at is None
            and self.expires_at > now
            and (self.max_uses is None or self.uses < self.max_uses)
        )
