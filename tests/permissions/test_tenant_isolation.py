"""No GET route leaks another organisation's data.

Every GET route of the application is enumerated (the router tree *and* the OpenAPI paths, so a
new route is covered the day it is added, and one hidden from the schema too). Its path
parameters are filled with the ids of a victim organisation's objects (models of every kind, a
training, a topic, collections, users…) and it is called as the admin of another organisation:
the answer must be 404 or an empty list. Routes without path parameters (lists, the caller's own
data) answer about the caller's own organisation. No 2xx body may contain any of the victim's
ids, names or slugs. Optional query parameters that select a user or a model are tried with the
victim's ids too, and must answer exactly as they do for an id that does not exist (no existence
oracle). Anonymous callers get 401 everywhere but health and the docs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from typing import Any

import pytest
from fastapi.routing import APIRoute

from flplatform.blobs import open_store
from flplatform.inference.jobs import INFERENCE_JOB
from flplatform.organizations.invitations import create_invitation
from flplatform.orm import GlobalModel, GlobalModelRound, LocalModel, Metric, SWAGModel, Training
from flplatform.orm.base import utcnow
from flplatform.orm.broker import BrokerMessage, BrokerTopic, BrokerTopicGrant
from flplatform.orm.workqueue import QueuedWork, WorkKind, WorkStatus
from tests.permissions.conftest import OrgTree, build_org_tree

# What anonymous callers may read.
PUBLIC = {"/health", "/ready", "/ui/"}  # /ui/: the dashboard's page shell holds no data
# Path parameters that select nothing of anyone else (the caller's own billing period).
CALLER_PARAMS = {"period"}
# Query parameters that select someone else's data: tried with victim ids.
SELECTING_QUERY = {"user_id", "model_id", "actor_id", "organisation_id", "organization_id", "training_id"}


def get_routes(app: Any) -> list[str]:
    """Every GET path: walked through the router tree (included routers too), united with the
    OpenAPI document."""

    def walk(routes: list[Any], prefix: str = "") -> list[str]:
        found = []
        for route in routes:
            original = getattr(route, "original_router", None)
            if original is not None:
                context = getattr(route, "include_context", None)
                found += walk(original.routes, prefix + (getattr(context, "prefix", "") or ""))
            elif isinstance(route, APIRoute) and "GET" in route.methods:
                found.append(prefix + route.path)
        return found

    walked = set(walk(app.routes))
    documented = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}
    return sorted(walked | documented)


def query_params(app: Any, path: str) -> list[str]:
    ops = app.openapi()["paths"].get(path, {}).get("get", {})
    return [p["name"] for p in ops.get("parameters", []) if p["in"] == "query"]


W = hashlib.sha256(b"w").hexdigest()


async def _victim_data(app: Any, tree: OrgTree) -> dict[str, Any]:
    """Models (global, SWAG, local), a training with a participant, a metric, a topic with a
    grant and a stored message, an invitation — written directly, as the services would."""
    coach, member = tree.project_coach.user, tree.member_one.user
    await open_store(app.state.settings).put(b"w")
    async with app.state.sessionmaker() as session:
        glob = GlobalModel(
            owner_id=coach.id,
            name="victim-model-secret",
            description="victim-description",
            weights_digest=W,
            weights_format="torchscript",
            weights_size=1,
        )
        swag = SWAGModel(
            owner_id=coach.id,
            name="victim-swag-secret",
            weights_digest=W,
            weights_format="torchscript",
            weights_size=1,
            swag_first_digest=W,
            swag_second_digest=W,
        )
        session.add_all([glob, swag])
        await session.flush()
        session.add(
            GlobalModelRound(
                model_id=glob.id, round=0, weights_digest=W, weights_format="torchscript", weights_size=1
            )
        )
        training = Training(
            model_id=glob.id,
            actor_id=coach.id,
            target_num_updates=1,
            participants=[member],
            options={},
            metric_names=[],
        )
        local = LocalModel(
            owner_id=member.id,
            base_model_id=glob.id,
            sample_size=3,
            weights_digest=W,
            weights_format="safetensors",
            weights_size=1,
        )
        session.add_all([training, local])
        await session.flush()
        session.add(Metric(model_id=glob.id, key="victim-metric", value_float=0.5, reporter_id=member.id))
        topic = BrokerTopic(slug="victim-topic", owner_id=coach.id, is_public=True, api_info={})
        session.add(topic)
        await session.flush()
        session.add(BrokerTopicGrant(topic_id=topic.id, user_id=member.id, can_consume=True))
        session.add(BrokerMessage(topic_id=topic.id, message_id=uuid.uuid4(), content='{"victim": 1}'))
        invitation, _ = await create_invitation(
            session,
            tree.org.id,
            by=None,
            expires_in=dt.timedelta(days=1),
            max_uses=None,
            note="victim-invitation",
        )
        job = QueuedWork(
            kind=WorkKind.INFERENCE,
            status=WorkStatus.FINISHED,
            handler=INFERENCE_JOB,
            payload={},
            model_id=glob.id,
            submitter_id=member.id,
            attempts=1,
            max_attempts=1,
            started_at=utcnow(),
            finished_at=utcnow(),
            result={"model_id": str(glob.id)},
        )  # an inference job's result
        session.add(job)
        # The organisation's money: a top-up, a member's limit, a bill.
        from flplatform import billing
        from flplatform.billing import limits
        from flplatform.orm.billing import Currency

        await billing.top_up(session, organization_id=tree.org.id, amount=10**8, key="victim-topup")
        await limits.set_limit(session, tree.org.id, member.id, Currency.USD, 10**8, by=None)
        await billing.create_bill(
            session, organization_id=tree.org.id, amount=10**8, description="victim-bill"
        )
        await session.commit()
        assert glob.organization_id == swag.organization_id == local.organization_id == tree.org.id
        assert training.organization_id == topic.organization_id == tree.org.id
    return {
        "global": glob.id,
        "swag": swag.id,
        "local": local.id,
        "training": training.id,
        "topic": topic.id,
        "invitation": invitation.id,
        "job": job.id,
    }


def _markers(tree: OrgTree, data: dict[str, Any]) -> set[str]:
    ids = {str(v) for v in data.values()} | {str(tree.org.id)}
    ids |= {str(p.id) for p in tree.projects} | {str(g.id) for row in tree.groups for g in row}
    ids |= {
        a.id
        for name, a in tree.actors.items()
        if a.user is not None and name not in ("other_admin", "superuser")
    }
    names = {
        "victim-model-secret",
        "victim-swag-secret",
        "victim-description",
        "victim-metric",
        "victim-topic",
        "victim-invitation",
        "victim-topup",
        "victim-bill",
        f'{tree.org.name}"',
    }
    names |= {
        a.user.username
        for name, a in tree.actors.items()
        if a.user is not None and name not in ("other_admin", "superuser")
    }
    return ids | names


def _values(tree: OrgTree, data: dict[str, Any]) -> dict[str, list[str]]:
    """Victim values per path parameter; a new parameter name fails the test until added here."""
    return {
        "model_id": [str(data["global"]), str(data["swag"]), str(data["local"])],
        "training_id": [str(data["training"])],
        "slug": ["victim-topic"],
        "organization_id": [str(tree.org.id)],
        "project_id": [str(tree.projects[0].id)],
        "group_id": [str(tree.groups[0][0].id)],
        "collection_id": [str(tree.org.id), str(tree.projects[0].id), str(tree.groups[0][0].id)],
        "user_id": [tree.member_one.id, tree.project_coach.id],
        "invitation_id": [str(data["invitation"])],
        "job_id": [str(data["job"])],
        "operation_id": [str(uuid.uuid4())],  # operations are the caller's own (billing router)
        "period": [utcnow().strftime("%Y-%m")],
    }


def _fill(path: str, values: dict[str, list[str]]) -> list[str]:
    paths = [path]
    while any("{" in p for p in paths):
        expanded = []
        for p in paths:
            if "{" not in p:
                expanded.append(p)
                continue
            name = p[p.index("{") + 1 : p.index("}")].split(":")[0]
            assert name in values, (
                f"GET {path}: add victim values for the path parameter {name!r} to this test"
            )
            expanded += [p[: p.index("{")] + v + p[p.index("}") + 1 :] for v in values[name]]
        paths = expanded
    return paths


def _empty(response: Any) -> bool:
    try:
        return response.json() == []
    except ValueError:
        return False


@pytest.fixture
async def victim(app: Any) -> tuple[OrgTree, dict[str, Any]]:
    tree = await build_org_tree(app, "v", projects=1, groups=1)
    return tree, await _victim_data(app, tree)


async def test_no_get_route_leaks_to_another_organisation_or_anonymous(app, client, victim) -> None:
    tree, data = victim
    intruder = tree.other_admin
    markers = _markers(tree, data)
    values = _values(tree, data)
    problems: list[str] = []
    routes = get_routes(app)
    assert len(routes) >= 40  # the walk really enumerates the application
    for route in routes:
        for url in _fill(route, values):
            response = await client.get(url, headers=intruder.headers, follow_redirects=False)
            params = {part[1:-1] for part in route.split("/") if part.startswith("{")}
            if params - CALLER_PARAMS:
                ok = response.status_code == 404 or (response.status_code == 200 and _empty(response))
            else:  # about the caller: allowed (200) or a platform-wide view refused (403)
                ok = response.status_code in (200, 403)
            if not ok:
                problems.append(f"GET {url}: {response.status_code} {response.text[:120]}")
            if response.status_code < 300:
                leaked = sorted(m for m in markers if m in response.text)
                if leaked:
                    problems.append(f"GET {url} shows the victim's {leaked}")
        # Selecting query parameters: the victim's id must answer like an id that does not exist.
        for name in set(query_params(app, route)) & SELECTING_QUERY:
            aliases = {"actor_id": "user_id", "organisation_id": "organization_id"}
            victim_ids = values[aliases.get(name, name)]
            for url in _fill(route, values)[:1]:
                for value in victim_ids:
                    got = await client.get(url, params={name: value}, headers=intruder.headers)
                    unknown = await client.get(
                        url, params={name: str(uuid.uuid4())}, headers=intruder.headers
                    )
                    if got.status_code != unknown.status_code:
                        problems.append(
                            f"GET {url}?{name}=<victim>: {got.status_code}, unknown id: {unknown.status_code}"
                        )
                    if got.status_code < 300 and any(m in got.text for m in markers - {value}):
                        problems.append(f"GET {url}?{name}=<victim> shows victim data")
    # Anonymous callers: 401 everywhere but health and the docs (same victim data, one set-up).
    for route in routes:
        for url in _fill(route, values)[:1]:
            response = await client.get(url, follow_redirects=False)
            expected = 200 if route in PUBLIC else 401
            if response.status_code != expected:
                problems.append(f"anonymous GET {url}: {response.status_code}, expected {expected}")
    for url in ("/docs", "/openapi.json"):
        assert (await client.get(url)).status_code == 200
    assert not problems, "cross-organisation or anonymous leaks:\n  " + "\n  ".join(problems)


def test_the_dashboard_reads_only_walked_routes(app) -> None:
    """The dashboard (``/ui/``) is a static shell: everything it shows comes from API GET routes
    with the signed-in user's token. Each path its script requests is one of the routes walked
    above, so the walk covers what the dashboard can show (``api/auth/token/`` is the log-in POST)."""
    import re
    from importlib import resources

    script = resources.files("flplatform").joinpath("static/dashboard/dashboard.js").read_text()
    requested = {
        "/api/" + re.sub(r"\$\{[^}]*\}", "{x}", path) for path in re.findall(r"[`\"]api/([^`\"?]*)", script)
    }
    assert len(requested) >= 10, requested
    routes = [re.compile("^" + re.sub(r"\{[^}]*\}", "[^/]+", r) + "$") for r in get_routes(app)]
    assert "/api/trainings/{x}/events/" in requested  # the live timeline's event stream
    unwalked = sorted(p for p in requested - {"/api/auth/token/"} if not any(r.match(p) for r in routes))
    assert unwalked == [], f"the dashboard requests routes the walk does not cover: {unwalked}"
