"""Fixture factory: an organisation tree with named actors (Kolibri's
``create_dummy_facility_data``), callable twice for a second organisation."""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import delete, event

from flplatform.auth.credentials import encrypt, hash_password, new_user_token, token_digest
from flplatform.organizations.service import new_child, new_organization
from flplatform.orm import ApiToken, Base, User
from flplatform.orm.base import utcnow
from flplatform.orm.organizations import (
    Collection,
    CollectionKind,
    Membership,
    Organization,
    OrganizationSettings,
    Role,
    RoleKind,
)

PASSWORD = "password-123"
_HASH: dict[str, str] = {}


@dataclass
class Actor:
    """A named caller: ``headers`` is empty for the anonymous actor."""

    name: str
    user: User | None
    token: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"} if self.token else {}

    @property
    def id(self) -> str:
        assert self.user is not None
        return str(self.user.id)


@dataclass
class OrgTree:
    org: Organization
    projects: list[Collection]
    groups: list[list[Collection]]
    actors: dict[str, Actor] = field(default_factory=dict)
    other: OrgTree | None = None

    def __getattr__(self, name: str) -> Actor:
        actors = self.__dict__.get("actors", {})
        if name in actors:
            return actors[name]
        raise AttributeError(name)


ACTORS = (
    "superuser",
    "org_admin",
    "project_coach",
    "group_coach",
    "member_one",
    "member_all",
    "orphan",
    "other_admin",
    "anonymous",
)


async def _password_hash() -> str:
    if "h" not in _HASH:
        _HASH["h"] = await hash_password(PASSWORD)
    return _HASH["h"]


def _user(
    session: Any, username: str, org: Organization | None, password_hash: str, *, superuser: bool = False
) -> Actor:
    """A user with a primary token, added without a flush (ids are set here) so a whole tree is
    written by a handful of batched INSERTs."""
    user = User(
        id=uuid.uuid4(),
        username=username,
        email=f"{username}@example.org",
        password_hash=password_hash,
        is_superuser=superuser,
        is_staff=superuser,
        organization_id=org.id if org else None,
    )
    token = new_user_token()
    session.add(user)
    session.add(
        ApiToken(
            user_id=user.id,
            name="primary",
            digest=token_digest(token),
            prefix=token[:8],
            is_primary=True,
            encrypted=encrypt(token),
            created_at=utcnow(),
        )
    )
    return Actor(username, user, token)


async def build_org_tree(
    app: Any,
    prefix: str = "a",
    *,
    projects: int = 2,
    groups: int = 2,
    superuser: bool = True,
    second: bool = True,
) -> OrgTree:
    """``org`` > ``projects[i]`` > ``groups[i][j]`` with the actors of ``ACTORS``:
    project_coach coaches projects[0]; group_coach coaches groups[0][0]; member_one is in
    groups[0][0]; member_all in every group; orphan is in the organisation only; other_admin
    administers a second organisation (``tree.other``, built the same way when ``second``).
    ``prefix`` keeps names unique, so several trees can live in one database."""
    password_hash = await _password_hash()
    async with app.state.sessionmaker() as session:
        org = new_organization(f"{prefix}-org")
        session.add(org)
        session.add(OrganizationSettings(organization_id=org.id))
        tree = OrgTree(org=org, projects=[], groups=[])
        for i in range(projects):
            project = new_child(org, CollectionKind.PROJECT, f"{prefix}-p{i}")
            session.add(project)
            tree.projects.append(project)
            tree.groups.append(
                [new_child(project, CollectionKind.GROUP, f"{prefix}-g{i}{j}") for j in range(groups)]
            )
            session.add_all(tree.groups[-1])
        act = tree.actors
        if superuser:
            act["superuser"] = _user(session, f"{prefix}-root", None, password_hash, superuser=True)
        for name in ("org_admin", "project_coach", "group_coach", "member_one", "member_all", "orphan"):
            act[name] = _user(session, f"{prefix}-{name}", org, password_hash)
        act["anonymous"] = Actor("anonymous", None)
        # Collections first (users point at the organisation), then the rest in one flush.
        await session.flush()

        def role(actor: str, collection: Collection, kind: RoleKind) -> None:
            session.add(Role(user_id=act[actor].user.id, collection_id=collection.id, kind=kind))

        def member(actor: str, collection: Collection) -> None:
            session.add(Membership(user_id=act[actor].user.id, collection_id=collection.id))

        role("org_admin", org, RoleKind.ADMIN)
        if projects:
            role("project_coach", tree.projects[0], RoleKind.COACH)
            if groups:
                role("group_coach", tree.groups[0][0], RoleKind.COACH)
                member("member_one", tree.projects[0])
                member("member_one", tree.groups[0][0])
        for i, project in enumerate(tree.projects):
            if tree.groups[i]:
                member("member_all", project)
            for group in tree.groups[i]:
                member("member_all", group)
        await session.commit()
    if second:
        tree.other = await build_org_tree(
            app, prefix + "x", projects=projects, groups=groups, superuser=False, second=False
        )
        act["other_admin"] = tree.other.actors["org_admin"]
    return tree


async def clear_tables(app: Any) -> None:
    """Empty every table between two builds inside one test (the harness empties after it)."""
    async with app.state.engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            await conn.execute(delete(table))


@pytest.fixture
def org_tree_factory(app: Any):  # type: ignore[no-untyped-def]
    async def _build(prefix: str = "a", **kw: Any) -> OrgTree:
        return await build_org_tree(app, prefix, **kw)

    return _build


@pytest.fixture
async def tree(org_tree_factory: Any) -> OrgTree:
    return await org_tree_factory()


_COUNTING: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "flp_statement_counter", default=None
)


class StatementCounter:
    """Counts SQL statements on an engine (``before_cursor_execute``) issued from the context that
    entered the counter (and tasks started from it: the request), not from background tasks that
    happen to run meanwhile (notification dispatcher, sweepers)."""

    def __init__(self, engine: Any):
        self.engine = engine.sync_engine
        self.statements: list[str] = []
        self._token: contextvars.Token[object | None] | None = None

    def _on(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if _COUNTING.get() is self:
            self.statements.append(statement)

    def __enter__(self) -> StatementCounter:
        self._token = _COUNTING.set(self)
        event.listen(self.engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *exc: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on)
        assert self._token is not None
        _COUNTING.reset(self._token)

    @property
    def count(self) -> int:
        return len(self.statements)
