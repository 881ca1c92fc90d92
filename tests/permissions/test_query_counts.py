"""Query-count guards: list endpoints issue a fixed number of SQL statements, whatever the number
of rows they return (no N+1), counted with a SQLAlchemy ``before_cursor_execute`` listener.

* Every GET route whose answer is a JSON array (found in the OpenAPI document, so a new list
  route is covered automatically) is called for several actors, then the data grows (more models
  of every kind, trainings, local updates, metrics, topics, grants, messages, groups, members,
  invitations, tokens, inference jobs) and the statement count must not grow.
* The issue's scale case: an organisation with 100 projects × 10 groups and 1,000 models; an
  organisation coach lists all 1,000 groups and all 1,000 models in as many statements as in
  an organisation with one of each.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flplatform.auth.credentials import token_digest
from flplatform.inference.jobs import INFERENCE_JOB
from flplatform.organizations.invitations import create_invitation
from flplatform.organizations.service import new_child
from flplatform.orm import (
    ApiToken,
    GlobalModel,
    GlobalModelRound,
    LocalModel,
    MeanModel,
    Metric,
    RoundSelection,
    SWAGModel,
    Training,
    User,
)
from flplatform.orm.base import utcnow
from flplatform.orm.broker import BrokerMessage, BrokerTopic, BrokerTopicGrant
from flplatform.orm.organizations import CollectionKind, Membership, Role, RoleKind
from flplatform.orm.training import training_participants
from flplatform.orm.workqueue import QueuedWork, WorkKind, WorkStatus
from tests.permissions.conftest import OrgTree, StatementCounter, build_org_tree

# List routes whose rows this test cannot grow (billing data has its own tests); they are still
# called, but only checked for a stable count.
NOT_GROWN = {
    "/api/billing/coupons/",
    "/api/billing/operations/",
    "/api/billing/bills/",
    "/api/billing/prices/",
    "/api/audit-log/",
    "/api/organizations/",
    "/api/billing/earnings/",
    "/api/market/models/",  # published models: grown in tests/billing/test_market.py
    "/api/organizations/{organization_id}/billing/limits/",
    "/api/organizations/{organization_id}/billing/audit-log/",
    "/api/organizations/{organization_id}/billing/operations/",
    "/api/organizations/{organization_id}/billing/bills/",
    "/api/organizations/{organization_id}/billing/earnings/",
}
ACTORS = ("org_admin", "project_coach", "member_all")


def _parameters(app: Any, url: str) -> list[dict[str, Any]]:
    """The OpenAPI parameters of the GET route ``url`` was filled from."""
    for path, ops in app.openapi()["paths"].items():
        pattern = path.split("/")
        parts = url.split("?")[0].split("/")
        if len(pattern) == len(parts) and all(
            a == b or a.startswith("{") for a, b in zip(pattern, parts, strict=True)
        ):
            if "get" in ops and all(
                a == b for a, b in zip(pattern, parts, strict=True) if not a.startswith("{")
            ):
                return ops["get"].get("parameters", [])
    return []


def list_routes(app: Any) -> list[str]:
    out = []
    for path, ops in app.openapi()["paths"].items():
        schema = (
            ops.get("get", {})
            .get("responses", {})
            .get("200", {})
            .get("content", {})
            .get("application/json", {})
            .get("schema", {})
        )
        if schema.get("type") == "array":
            out.append(path)
    return sorted(out)


async def grow(app: Any, tree: OrgTree, n: int, anchors: dict[str, Any]) -> None:
    """Add ``n`` of everything (each model kind, with a training, local updates, metrics, a topic
    with a grant and a message, a group with members, an invitation, a token); the first call
    sets ``anchors``: the objects whose sub-lists the path routes read."""
    coach, members = tree.project_coach.user, [tree.member_one.user, tree.member_all.user]
    async with app.state.sessionmaker() as session:
        for i in range(n):
            tag = uuid.uuid4().hex[:8]
            glob = GlobalModel(owner_id=coach.id, name=f"g{tag}", weights_size=0, organization_id=tree.org.id)
            swag = SWAGModel(owner_id=coach.id, name=f"s{tag}", weights_size=0, organization_id=tree.org.id)
            session.add_all([glob, swag])
            await session.flush()
            session.add(
                MeanModel(
                    owner_id=coach.id,
                    name=f"m{tag}",
                    weights_size=0,
                    organization_id=tree.org.id,
                    members=[glob, swag],
                )
            )
            session.add(GlobalModelRound(model_id=glob.id, round=0, weights_size=0))
            training = Training(
                model_id=glob.id,
                actor_id=coach.id,
                target_num_updates=1,
                participants=members,
                options={},
                metric_names=[],
                organization_id=tree.org.id,
            )
            session.add(training)
            anchors.setdefault("model", glob.id)
            anchors.setdefault("base", glob)
            base = anchors["base"]
            for round_, member in enumerate(members):
                for model in (glob, base):  # grows the anchor training's local models too
                    session.add(
                        LocalModel(
                            owner_id=member.id,
                            base_model_id=model.id,
                            sample_size=1,
                            round=i * 2 + round_,
                            weights_size=0,
                            organization_id=tree.org.id,
                        )
                    )
            session.add_all(
                [
                    Metric(model_id=model_id, key=f"k{tag}", value_float=1.0, reporter_id=coach.id)
                    for model_id in (glob.id, anchors["model"])
                ]
            )
            topic = BrokerTopic(
                slug=f"t{tag}",
                owner_id=coach.id,
                is_public=i % 2 == 0,
                api_info={},
                organization_id=tree.org.id,
            )
            session.add(topic)
            await session.flush()
            anchors.setdefault("topic", topic)
            anchors.setdefault("training", training.id)
            for topic_id in {topic.id, anchors["topic"].id}:
                session.add(BrokerMessage(topic_id=topic_id, message_id=uuid.uuid4(), content="{}"))
            session.add(
                BrokerTopicGrant(topic_id=topic.id, user_id=tree.member_all.user.id, can_consume=True)
            )
            group = new_child(tree.projects[0], CollectionKind.GROUP, f"grp{tag}")
            session.add_all([group, new_child(tree.org, CollectionKind.PROJECT, f"prj{tag}")])
            newcomer = User(id=uuid.uuid4(), username=f"u{tag}", organization_id=tree.org.id)
            session.add(newcomer)
            await session.flush()
            session.add_all([Membership(user_id=m.id, collection_id=group.id) for m in members])
            session.add_all(
                [Membership(user_id=newcomer.id, collection_id=c.id) for c in (tree.projects[0], group)]
            )
            session.add(Role(user_id=tree.group_coach.user.id, collection_id=group.id, kind=RoleKind.COACH))
            session.add(Role(user_id=newcomer.id, collection_id=tree.projects[0].id, kind=RoleKind.COACH))
            session.add(BrokerTopicGrant(topic_id=anchors["topic"].id, user_id=newcomer.id, can_produce=True))
            # a new participant of the anchor training, with an update (grows the "latest" list)
            await session.execute(
                training_participants.insert().values(
                    training_id=anchors["training"], user_id=newcomer.id, joined_at=utcnow()
                )
            )
            # ... and a recorded client selection of one more round (GET .../rounds/)
            anchors["rounds"] = anchors.get("rounds", -1) + 1
            session.add(
                RoundSelection(training_id=anchors["training"], round=anchors["rounds"], user_id=newcomer.id)
            )
            session.add(
                LocalModel(
                    owner_id=newcomer.id,
                    base_model_id=base.id,
                    sample_size=1,
                    round=0,
                    weights_size=0,
                    organization_id=tree.org.id,
                )
            )
            await create_invitation(
                session, tree.org.id, by=None, expires_in=dt.timedelta(days=1), max_uses=None, note=tag
            )
            for actor in ACTORS:
                user = tree.actors[actor].user
                session.add(
                    ApiToken(
                        user_id=user.id,
                        name=tag,
                        digest=token_digest(tag + actor),
                        prefix=tag,
                        created_at=utcnow(),
                    )
                )
                session.add(
                    QueuedWork(
                        kind=WorkKind.INFERENCE,
                        status=WorkStatus.FINISHED,
                        handler=INFERENCE_JOB,
                        payload={},
                        model_id=glob.id,
                        submitter_id=user.id,
                        attempts=1,
                        max_attempts=1,
                        started_at=utcnow(),
                        finished_at=utcnow(),
                        result={},
                    )
                )  # an inference job
        await session.commit()


def _fill(path: str, tree: OrgTree, anchors: dict[str, Any]) -> str:
    """The route with the anchors' ids (and ``limit=1000`` where the route pages)."""
    values = {
        "slug": anchors["topic"].slug,
        "organization_id": tree.org.id,
        "project_id": tree.projects[0].id,
        "collection_id": tree.projects[0].id,
        "model_id": anchors["model"],
        "training_id": anchors["training"],
    }
    for name, value in values.items():
        path = path.replace("{" + name + "}", str(value))
    assert "{" not in path, f"{path}: add a value for its path parameter to this test"
    return path


async def _count(app: Any, client: Any, url: str, headers: dict[str, str], runs: int = 1) -> tuple[int, int]:
    paged = any(p["name"] == "limit" for p in _parameters(app, url))
    url = url + ("?limit=1000" if paged and "?" not in url else "")
    """(statements, rows) of the request: the least over ``runs`` runs (once-per-interval
    bookkeeping such as a token's ``last_used_at`` happens in one of them only)."""
    counts, rows = [], 0
    for _ in range(runs):
        with StatementCounter(app.state.engine) as counter:
            response = await client.get(url, headers=headers)
        assert response.status_code in (200, 403), (url, response.text)  # 403: a superuser-only list
        counts.append(counter.count)
        rows = len(response.json()) if response.status_code == 200 else 0
    return min(counts), rows


async def test_list_endpoints_issue_a_fixed_number_of_statements(app, client) -> None:
    tree = await build_org_tree(app, "q", projects=2, groups=2, second=False)
    anchors: dict[str, Any] = {}
    await grow(app, tree, 1, anchors)
    routes = list_routes(app)
    assert len(routes) >= 20
    before = {
        (r, a): await _count(app, client, _fill(r, tree, anchors), tree.actors[a].headers)
        for r in routes
        for a in ACTORS
    }
    await grow(app, tree, 4, anchors)
    problems, grown = [], set()
    for (route, actor), (statements, rows) in before.items():
        url, headers = _fill(route, tree, anchors), tree.actors[actor].headers
        after, rows_after = await _count(app, client, url, headers)
        if after > statements:  # measure again, in case bookkeeping happened in this run
            after, rows_after = await _count(app, client, url, headers, runs=2)
        # "Fewer" happens: per-request bookkeeping (a token's last use, a cache fill) is not
        # repeated once done; what must never happen is more statements for more rows.
        if after > statements:
            problems.append(
                f"GET {route} as {actor}: {statements} statements for {rows} rows, {after} for {rows_after}"
            )
        if rows_after > rows:
            grown.add(route)
    assert not problems, "statement counts depend on the number of rows:\n  " + "\n  ".join(problems)
    assert set(routes) - grown <= NOT_GROWN, (
        f"lists this test did not grow: {sorted(set(routes) - grown - NOT_GROWN)}"
    )


async def _scaled_org(app: Any, prefix: str, projects: int, groups: int, models: int) -> OrgTree:
    tree = await build_org_tree(app, prefix, projects=0, groups=0, superuser=False, second=False)
    async with app.state.sessionmaker() as session:
        for i in range(projects):
            project = new_child(tree.org, CollectionKind.PROJECT, f"{prefix}-p{i:03}")
            session.add(project)
            session.add_all(
                [new_child(project, CollectionKind.GROUP, f"{prefix}-g{i:03}-{j}") for j in range(groups)]
            )
        session.add(Role(user_id=tree.project_coach.user.id, collection_id=tree.org.id, kind=RoleKind.COACH))
        owner = tree.member_all.user.id
        session.add_all(
            [
                GlobalModel(
                    id=uuid.uuid4(), owner_id=owner, name=f"m{i}", weights_size=0, organization_id=tree.org.id
                )
                for i in range(models)
            ]
        )
        await session.commit()
    return tree


async def test_coach_lists_a_thousand_objects_in_constant_statements(app, client) -> None:
    small = await _scaled_org(app, "s", 1, 1, 1)
    big = await _scaled_org(app, "b", 100, 10, 1000)
    for url, expected in (("/api/groups/", 1000), ("/api/models/", 1000)):
        few, rows_few = await _count(app, client, url, small.project_coach.headers, runs=2)
        many, rows_many = await _count(app, client, url, big.project_coach.headers, runs=2)
        assert (rows_few, rows_many) == (1, expected)
        assert many <= few, f"{url}: {few} statements for 1 row, {many} for {expected}"
