"""Property test: on random organisation trees, memberships, roles, models, trainings and topics,
the policy's SQL clauses, its ``can_read`` booleans and a plain in-memory oracle (docs/permissions.md's
permission table written as Python) give the same answers — for every requester, on SQLite and
PostgreSQL. ``users_without_role`` (training creation's ``has_role_for_user``) is checked too.

Each example writes its rows with fresh ids and restricts every query to them, so examples share
the test's database without emptying it in between.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm import Collection, GlobalModel, LocalModel, Model, Training, User
from flplatform.orm.broker import BrokerTopic, BrokerTopicGrant
from flplatform.orm.organizations import CollectionKind, Membership, Role, RoleKind
from flplatform.permissions import Requester, can_read, readable, users_without_role
from flplatform.permissions.requester import ANY_ROLE

EXAMPLES = int(os.environ.get("FLP_ORACLE_EXAMPLES", "12"))


# ---------------------------------------------------------------------------- the random graph


@dataclass
class Coll:
    id: uuid.UUID
    kind: CollectionKind
    org: int  # index of its organisation
    parent: int | None  # index in Graph.colls


@dataclass
class Person:
    id: uuid.UUID
    org: int | None
    superuser: bool
    members: set[int] = field(default_factory=set)  # collection indexes (explicit rows)
    roles: set[tuple[int, RoleKind]] = field(default_factory=set)


@dataclass
class Graph:
    colls: list[Coll]
    people: list[Person]
    models: list[tuple[uuid.UUID, int]]  # (id, owner index)
    trainings: list[tuple[uuid.UUID, int, int, set[int]]]  # (id, model index, actor, participants)
    locals_: list[tuple[uuid.UUID, int, int]]  # (id, training index, owner)
    topics: list[tuple[uuid.UUID, int | None, bool, set[int]]]  # (id, owner, is_public, grantees)

    def org_coll(self, org: int) -> int:
        return next(
            i for i, c in enumerate(self.colls) if c.kind == CollectionKind.ORGANIZATION and c.org == org
        )

    def person_org_id(self, person: Person) -> uuid.UUID | None:
        return None if person.org is None else self.colls[self.org_coll(person.org)].id


@st.composite
def graphs(draw: Any) -> Graph:
    colls: list[Coll] = []
    for org in range(2):
        colls.append(Coll(uuid.uuid4(), CollectionKind.ORGANIZATION, org, None))
        org_index = len(colls) - 1
        for _ in range(draw(st.integers(1, 2))):
            colls.append(Coll(uuid.uuid4(), CollectionKind.PROJECT, org, org_index))
            project = len(colls) - 1
            for kind in draw(
                st.lists(st.sampled_from([CollectionKind.GROUP, CollectionKind.ADHOC]), max_size=2)
            ):
                colls.append(Coll(uuid.uuid4(), kind, org, project))
    people = []
    for _ in range(draw(st.integers(2, 7))):
        org = draw(st.sampled_from([0, 1, None]))
        person = Person(uuid.uuid4(), org, superuser=org is None and draw(st.integers(0, 5)) == 0)
        if org is not None:
            mine = [i for i, c in enumerate(colls) if c.org == org]
            for i in mine:
                coll = colls[i]
                if coll.kind != CollectionKind.ORGANIZATION and draw(st.booleans()):
                    person.members.add(i)
                    if coll.parent is not None and colls[coll.parent].kind != CollectionKind.ORGANIZATION:
                        person.members.add(coll.parent)  # explicit rows at every level
                if draw(st.integers(0, 3)) == 0:
                    kind = (
                        RoleKind.ADMIN
                        if coll.kind == CollectionKind.ORGANIZATION and draw(st.booleans())
                        else RoleKind.COACH
                    )
                    person.roles.add((i, kind))
        people.append(person)
    owners = st.integers(0, len(people) - 1)
    models = [(uuid.uuid4(), draw(owners)) for _ in range(draw(st.integers(0, 4)))]
    trainings, locals_ = [], []
    for m, (_, owner) in enumerate(models):
        if draw(st.booleans()):
            same = [i for i, p in enumerate(people) if p.org == people[owner].org]
            participants = set(draw(st.lists(st.sampled_from(same), max_size=3)))
            trainings.append((uuid.uuid4(), m, owner, participants))
            for p in sorted(participants):
                if draw(st.booleans()):
                    locals_.append((uuid.uuid4(), len(trainings) - 1, p))
    topics = []
    for _ in range(draw(st.integers(0, 3))):
        owner = draw(st.one_of(st.none(), owners))
        tenant = None if owner is None else people[owner].org
        grantees = set(
            draw(
                st.lists(
                    st.sampled_from([i for i, p in enumerate(people) if p.org == tenant] or [0]), max_size=2
                )
            )
        )
        grantees = {g for g in grantees if people[g].org == tenant}
        topics.append((uuid.uuid4(), owner, draw(st.booleans()), grantees))
    return Graph(colls, people, models, trainings, locals_, topics)


# ---------------------------------------------------------------------------- the oracle


class Oracle:
    """The permission table of docs/permissions.md, in plain Python over the graph."""

    def __init__(self, graph: Graph):
        self.g = graph

    def model_org(self, index: int) -> int | None:
        return self.g.people[self.g.models[index][1]].org

    def in_org(self, r: Person | None) -> bool:
        return r is not None and not r.superuser and r.org is not None

    def same_tenant(self, r: Person | None, org: int | None) -> bool:
        if r is None or r.superuser:
            return False
        return org == r.org

    def org_role(self, r: Person | None, kinds: frozenset[RoleKind] = ANY_ROLE) -> bool:
        return self.in_org(r) and any(
            self.g.colls[c].kind == CollectionKind.ORGANIZATION and k in kinds for c, k in r.roles
        )  # type: ignore[union-attr]

    def ancestors(self, index: int) -> set[int]:
        out, coll = {index}, self.g.colls[index]
        while coll.parent is not None:
            out.add(coll.parent)
            coll = self.g.colls[coll.parent]
        return out

    def coaches_member(self, r: Person, target: Person, kinds: frozenset[RoleKind] = ANY_ROLE) -> bool:
        held = {c for c, k in r.roles if k in kinds}
        return bool(held & target.members)

    def user(self, r: Person | None, t: Person) -> bool:
        if r is None:
            return False
        if r.superuser or r is t:
            return True
        if r.org is None:
            return t.org is None and not t.superuser  # superusers are not listed to the DLR space
        return t.org == r.org and (self.org_role(r) or self.coaches_member(r, t))

    def collection(self, r: Person | None, index: int) -> bool:
        if r is None or r.superuser:
            return r is not None
        coll = self.g.colls[index]
        if not self.in_org(r) or coll.org != r.org:
            return False
        held = {c for c, _ in r.roles}
        return (
            coll.kind == CollectionKind.ORGANIZATION
            or bool(held & self.ancestors(index))
            or index in r.members
        )

    def training(self, r: Person | None, index: int) -> bool:
        if r is not None and r.superuser:
            return True
        _, model, actor, participants = self.g.trainings[index]
        me = None if r is None else self.g.people.index(r)
        return self.same_tenant(r, self.model_org(model)) and (
            me == actor or me in participants or self.org_role(r)
        )

    def takes_part(self, me: int, model: int) -> bool:
        return any(m == model and (me == actor or me in parts) for _, m, actor, parts in self.g.trainings)

    def model(self, r: Person | None, index: int) -> bool:
        if r is not None and r.superuser:
            return True
        me = None if r is None else self.g.people.index(r)
        return (
            r is not None
            and self.same_tenant(r, self.model_org(index))
            and (
                self.g.models[index][1] == me or self.org_role(r) or self.takes_part(me, index)  # type: ignore[arg-type]
            )
        )

    def local(self, r: Person | None, index: int) -> bool:
        if r is not None and r.superuser:
            return True
        _, training, owner = self.g.locals_[index]
        model = self.g.trainings[training][1]
        me = None if r is None else self.g.people.index(r)
        return (
            r is not None
            and self.same_tenant(r, self.model_org(model))
            and (
                owner == me or self.org_role(r) or self.takes_part(me, model)  # type: ignore[arg-type]
            )
        )

    def topic(self, r: Person | None, index: int) -> bool:
        if r is None:
            return False
        if r.superuser:
            return True
        _, owner, public, grantees = self.g.topics[index]
        org = None if owner is None else self.g.people[owner].org
        if org is not None and (not self.in_org(r) or r.org != org):
            return False
        me = self.g.people.index(r)
        return public or owner == me or me in grantees or (org is not None and self.org_role(r))

    def covers(self, r: Person | None, t: Person) -> bool:
        """has_role_for_user(r, any role, t)."""
        if r is None:
            return False
        if r.superuser:
            return True
        if r.org is None:
            return t.org is None
        return t.org == r.org and (self.org_role(r) or self.coaches_member(r, t))


# ---------------------------------------------------------------------------- writing and checking


async def _write(session: Any, g: Graph) -> None:
    for c in g.colls:
        parent = None if c.parent is None else g.colls[c.parent].id
        session.add(
            Collection.__mapper__.polymorphic_map[c.kind].class_(
                id=c.id, name=c.kind.value, parent_id=parent, organization_id=g.colls[g.org_coll(c.org)].id
            )
        )
    await session.flush()
    for p in g.people:
        session.add(
            User(
                id=p.id,
                username=f"u-{p.id.hex}",
                is_superuser=p.superuser,
                organization_id=g.person_org_id(p),
            )
        )
    await session.flush()
    for p in g.people:
        session.add_all([Membership(user_id=p.id, collection_id=g.colls[c].id) for c in p.members])
        session.add_all([Role(user_id=p.id, collection_id=g.colls[c].id, kind=k) for c, k in p.roles])
    for model_id, owner in g.models:
        session.add(GlobalModel(id=model_id, owner_id=g.people[owner].id, name="m", weights_size=0))
    await session.flush()
    people = {p.id: p for p in g.people}
    users = {
        u.id: u for u in (await session.execute(select(User).where(User.id.in_(list(people))))).scalars()
    }
    for training_id, model, actor, participants in g.trainings:
        session.add(
            Training(
                id=training_id,
                model_id=g.models[model][0],
                actor_id=g.people[actor].id,
                target_num_updates=1,
                options={},
                metric_names=[],
                participants=[users[g.people[i].id] for i in sorted(participants)],
            )
        )
    await session.flush()
    for local_id, training, owner in g.locals_:
        base = g.models[g.trainings[training][1]][0]
        session.add(
            LocalModel(
                id=local_id, owner_id=g.people[owner].id, base_model_id=base, sample_size=1, weights_size=0
            )
        )
    for topic_id, owner, public, grantees in g.topics:
        session.add(
            BrokerTopic(
                id=topic_id,
                slug=f"t-{topic_id.hex}",
                is_public=public,
                api_info={},
                owner_id=None if owner is None else g.people[owner].id,
            )
        )
        await session.flush()
        session.add_all(
            [BrokerTopicGrant(topic_id=topic_id, user_id=g.people[i].id, can_consume=True) for i in grantees]
        )
    await session.commit()


async def _check(url: str, g: Graph) -> None:
    engine = create_engine(url)
    try:
        sessions = create_sessionmaker(engine)
        async with sessions() as session:
            await _write(session, g)
        oracle = Oracle(g)
        async with sessions() as session:
            kinds: dict[str, tuple[type[Any], list[uuid.UUID], Any]] = {
                "user": (User, [p.id for p in g.people], lambda r, i: oracle.user(r, g.people[i])),
                "collection": (Collection, [c.id for c in g.colls], oracle.collection),
                "model": (
                    Model,
                    [m for m, _ in g.models] + [loc for loc, _, _ in g.locals_],
                    lambda r, i: (
                        oracle.model(r, i) if i < len(g.models) else oracle.local(r, i - len(g.models))
                    ),
                ),
                "training": (Training, [t[0] for t in g.trainings], oracle.training),
                "topic": (BrokerTopic, [t[0] for t in g.topics], oracle.topic),
            }
            loaded: dict[str, list[Any]] = {}
            for name, (cls, ids, _) in kinds.items():
                stmt = select(cls).where(cls.id.in_(ids))  # (can_read needs no participant list)
                rows = {row.id: row for row in (await session.execute(stmt)).scalars()}
                loaded[name] = [rows[i] for i in ids]
            users = {u.id: u for u in loaded["user"]}
            for r in [None, *g.people]:
                requester = await Requester.load(session, None if r is None else users[r.id])
                who = "anonymous" if r is None else f"user {g.people.index(r)}"
                for name, (cls, ids, expected_of) in kinds.items():
                    sql = set(
                        (
                            await session.execute(
                                select(cls.id).where(cls.id.in_(ids), readable(requester, cls))
                            )
                        ).scalars()
                    )
                    booleans = {obj.id for obj in loaded[name] if await can_read(requester, obj)}
                    expected = {ids[i] for i in range(len(ids)) if expected_of(r, i)}
                    assert sql == booleans, f"{who}, {name}: SQL clause and can_read disagree"
                    assert sql == expected, f"{who}, {name}: policy and oracle disagree"
                uncovered = {u.id for u in await users_without_role(requester, ANY_ROLE, loaded["user"])}
                assert uncovered == {p.id for p in g.people if not oracle.covers(r, p)}, (
                    f"{who}: has_role_for_user"
                )
    finally:
        await engine.dispose()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(graph=graphs())
def test_clauses_booleans_and_oracle_agree(db_url: str, graph: Graph) -> None:
    asyncio.run(_check(db_url, graph))
