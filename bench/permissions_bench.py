"""Permission checks at scale: the policy layer's clauses vs a recursive-CTE design.

An organisation with 100 projects × 10 groups, 2,000 members (each in one group, with the
explicit project row the services write), 1,000 models and 200 trainings of 5 participants.
Measured on SQLite (a temporary file; ``--url`` for PostgreSQL) for a group coach, a project
coach and an organisation admin:

* ``users``: ``readable(User)`` — the list a coach sees (explicit membership rows: one indexed
  ``IN``), against the same answer computed with a recursive CTE over ``parent_id`` where
  members have rows only at the group level (the "implicit membership" design);
* ``models``/``trainings``: ``readable(Model)``/``readable(Training)`` lists;
* ``can_read``: 200 single-object boolean checks on models (one indexed query each at most).

Run: ``.venv/bin/python bench/permissions_bench.py`` (figures go to docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, literal, select, union_all

from flplatform.db import create_engine, create_sessionmaker
from flplatform.organizations.service import new_child, new_organization
from flplatform.orm import Base, Collection, GlobalModel, Model, Training, User
from flplatform.orm.organizations import CollectionKind, Membership, Role, RoleKind
from flplatform.permissions import Requester, can_read, readable

PROJECTS, GROUPS, MEMBERS, MODELS, TRAININGS = 100, 10, 2000, 1000, 200


async def populate(session: Any) -> dict[str, Any]:
    org = new_organization("bench")
    session.add(org)
    projects = [new_child(org, CollectionKind.PROJECT, f"p{i}") for i in range(PROJECTS)]
    groups = [
        new_child(p, CollectionKind.GROUP, f"g{i}-{j}") for i, p in enumerate(projects) for j in range(GROUPS)
    ]
    session.add_all(projects + groups)
    await session.flush()
    users = [User(id=uuid.uuid4(), username=f"m{i}", organization_id=org.id) for i in range(MEMBERS)]
    coaches = {
        name: User(id=uuid.uuid4(), username=name, organization_id=org.id)
        for name in ("group_coach", "project_coach", "admin")
    }
    session.add_all(users + list(coaches.values()))
    await session.flush()
    rows = []
    for i, user in enumerate(users):
        group = groups[i % len(groups)]
        rows += [
            Membership(user_id=user.id, collection_id=group.id),
            Membership(user_id=user.id, collection_id=group.parent_id),
        ]
    session.add_all(rows)
    session.add_all(
        [
            Role(user_id=coaches["group_coach"].id, collection_id=groups[0].id, kind=RoleKind.COACH),
            Role(user_id=coaches["project_coach"].id, collection_id=projects[0].id, kind=RoleKind.COACH),
            Role(user_id=coaches["admin"].id, collection_id=org.id, kind=RoleKind.ADMIN),
        ]
    )
    models = [
        GlobalModel(
            id=uuid.uuid4(),
            owner_id=users[i % MEMBERS].id,
            name=f"n{i}",
            weights_size=0,
            organization_id=org.id,
        )
        for i in range(MODELS)
    ]
    session.add_all(models)
    await session.flush()
    session.add_all(
        [
            Training(
                model_id=models[i].id,
                actor_id=coaches["project_coach"].id,
                target_num_updates=1,
                options={},
                metric_names=[],
                organization_id=org.id,
                participants=users[i * 5 : i * 5 + 5],
            )
            for i in range(TRAININGS)
        ]
    )
    await session.commit()
    return {"coaches": coaches, "models": [m.id for m in models]}


def cte_readable_users(coach_id: uuid.UUID) -> Any:
    """The recursive alternative: descendants of every collection the coach holds a role on,
    then members with a row at any of them (as if rows existed only at the group level)."""
    roots = (
        select(Role.collection_id.label("id")).where(Role.user_id == coach_id).cte("below", recursive=True)
    )
    below = roots.union_all(select(Collection.id).where(Collection.parent_id == roots.c.id))
    members = select(Membership.user_id).where(Membership.collection_id.in_(select(below.c.id)))
    return select(User.id).where(User.id.in_(union_all(members, select(literal(coach_id)))))


async def timed(session: Any, stmt: Any, repeat: int) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        rows = len((await session.execute(stmt)).all())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, rows


async def main(url: str | None, repeat: int) -> None:
    path = None
    if url is None:
        path = Path(tempfile.mkdtemp()) / "perm.db"
        url = f"sqlite+aiosqlite:///{path}"
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    sessions = create_sessionmaker(engine)
    async with sessions() as session:
        data = await populate(session)
    print(
        f"{url.split(':')[0]}: {PROJECTS}×{GROUPS} groups, {MEMBERS} members, {MODELS} models, "
        f"{TRAININGS} trainings; median of {repeat} runs, ms"
    )
    print(
        "| requester | users: explicit rows | users: recursive CTE | models list | trainings list | "
        "200 × can_read(model) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    async with sessions() as session:
        for name, coach in data["coaches"].items():
            user = await session.get(User, coach.id)
            requester = await Requester.load(session, user)
            explicit, n1 = await timed(session, select(User.id).where(readable(requester, User)), repeat)
            cte, n2 = await timed(session, cte_readable_users(coach.id), repeat)
            models, n3 = await timed(session, select(Model.id).where(readable(requester, Model)), repeat)
            trainings, n4 = await timed(
                session, select(Training.id).where(readable(requester, Training)), repeat
            )
            objects = list(
                (await session.execute(select(Model).where(Model.id.in_(data["models"][:200])))).scalars()
            )
            start = time.perf_counter()
            allowed = sum([await can_read(requester, m) for m in objects])
            checks = (time.perf_counter() - start) * 1000
            same = "" if name == "admin" or n1 == n2 else " (differs!)"
            print(
                f"| {name} | {explicit:.1f} ({n1} rows) | {cte:.1f} ({n2} rows){same} | {models:.1f} ({n3}) | "
                f"{trainings:.1f} ({n4}) | {checks:.1f} ({allowed} allowed) |"
            )
        count = (await session.execute(select(func.count()).select_from(Membership))).scalar_one()
        print(f"membership rows: {count}")
    await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.repeat))
