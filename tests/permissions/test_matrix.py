"""The permission matrix over HTTP: actor × operation × resource kind → status code, and for
reads whether the list endpoint includes the object (the boolean check and the SQL clause agree).

One test per resource kind; it walks every operation and actor (a failure lists every
mismatching cell at once). After an operation that consumed the state (a delete, an added membership or
role) the next actor gets a fresh tree, so every actor meets the same state.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from flplatform.blobs import open_store
from flplatform.organizations.invitations import create_invitation
from flplatform.orm import GlobalModel, Metric, Training, User
from flplatform.orm.broker import BrokerTopic, BrokerTopicGrant
from tests.permissions.conftest import ACTORS, Actor, OrgTree, build_org_tree

# Expected outcome per actor, in ACTORS order:
#   superuser org_admin project_coach group_coach member_one member_all orphan other_admin anonymous
# "200+" = status 200 and the object is in the list endpoint's answer; "200" alone on a read
# means the list answered 200 without the object (the detail route, if any, must then be 404).
MATRIX: dict[tuple[str, str], str] = {
    ("organization", "read"): "200+ 200+ 200+ 200+ 200+ 200+ 200+ 404 401",
    ("organization", "create"): "201 403 403 403 403 403 403 403 401",
    ("organization", "update"): "200 200 403 403 403 403 403 404 401",
    ("organization", "delete"): "409 403 403 403 403 403 403 404 401",
    ("settings", "read"): "200 200 200 200 200 200 200 404 401",
    ("settings", "update"): "200 200 403 403 403 403 403 404 401",
    ("project", "read"): "200+ 200+ 200+ 404 200+ 200+ 404 404 401",
    ("project", "create"): "201 201 403 403 403 403 403 404 401",
    ("project", "update"): "200 200 403 404 403 403 404 404 401",
    ("project", "delete"): "204 204 403 404 403 403 404 404 401",
    ("group", "read"): "200+ 200+ 200+ 200+ 200+ 200+ 404 404 401",
    ("group", "create"): "201 201 201 404 403 403 404 404 401",
    ("group", "update"): "200 200 200 403 403 403 404 404 401",
    ("group", "delete"): "204 204 204 403 403 403 404 404 401",
    ("user", "read"): "200+ 200+ 200+ 200+ 200+ 404 404 404 401",
    ("user", "create"): "201 201 403 403 403 403 403 403 401",
    ("user", "update"): "200 200 403 403 200 404 404 404 401",
    ("user", "delete"): "200 200 403 403 403 404 404 404 401",
    ("membership", "read"): "200+ 200+ 200+ 200+ 200+ 200 404 404 401",
    ("membership", "create"): "201 201 201 403 403 403 404 404 401",
    ("membership", "delete"): "200 200 200 200 403 403 404 404 401",
    ("role", "read"): "200+ 200+ 200 200+ 200 200 404 404 401",
    ("role", "create"): "201 201 403 403 403 403 404 404 401",
    ("role", "delete"): "200 200 403 403 403 403 404 404 401",
    ("invitation", "read"): "200+ 200+ 403 403 403 403 403 404 401",
    ("invitation", "create"): "201 201 403 403 403 403 403 404 401",
    ("invitation", "delete"): "200 200 403 403 403 403 403 404 401",
    # Resources owned by the organisation: a model of project_coach, its training (actor
    # project_coach, participant member_one) with a metric, a topic of project_coach granted to
    # member_one. /api/trainings/ lists the trainings one runs or oversees, and every one for
    # superusers (a participant finds theirs in /api/users/trainings/), so "200" without "+" for
    # member_one.
    ("model", "read"): "200+ 200+ 200+ 404 200+ 404 404 404 401",
    ("model", "create"): "201 201 201 201 201 201 201 201 401",
    ("model", "update"): "202 202 202 404 403 404 404 404 401",
    ("model", "delete"): "200 200 200 404 403 404 404 404 401",
    ("metric", "read"): "200+ 200+ 200+ 404 200+ 404 404 404 401",
    ("metric", "create"): "201 403 201 404 201 404 404 404 401",
    ("training", "read"): "200+ 200+ 200+ 404 200 404 404 404 401",
    ("training", "create"): "201 403 201 404 403 404 404 404 401",
    ("training", "update"): "202 202 202 404 403 404 404 404 401",
    ("training", "delete"): "200 200 200 404 403 404 404 404 401",
    ("topic", "read"): "200+ 200+ 200+ 404 200+ 404 404 404 401",
    ("topic", "create"): "201 201 201 201 201 201 201 201 401",
    ("topic", "update"): "200 200 200 404 403 404 404 404 401",
    ("topic", "delete"): "200 200 200 404 403 404 404 404 401",
    # The organisation's money (billing/organizations): its admins and superusers; a member reads
    # their own spending. A top-up by the org admin moves their own (empty) balance: 402.
    ("org_money", "read"): "200 200 403 403 403 403 403 404 401",
    ("org_money", "create"): "201 402 403 403 403 403 403 404 401",
    ("org_money", "update"): "200 200 403 403 403 403 403 404 401",
    ("org_audit", "read"): "200 200 403 403 403 403 403 404 401",
    ("org_spending", "read"): "200 200 403 403 200 403 403 404 401",
}


@dataclass
class Outcome:
    status: int
    listed: bool | None = None

    def __str__(self) -> str:
        return f"{self.status}{'+' if self.listed else ''}"


Op = Callable[[httpx.AsyncClient, OrgTree, Actor], Awaitable[Outcome]]


def _ids(response: httpx.Response) -> set[str]:
    return {item["id"] for item in response.json()} if response.status_code == 200 else set()


async def _read(
    client: httpx.AsyncClient, actor: Actor, detail: str | None, listing: str, target: str
) -> Outcome:
    """Status of the detail route (or of the list when there is none) and list inclusion."""
    listed = await client.get(listing, headers=actor.headers)
    included = target in _ids(listed)
    if detail is None:
        return Outcome(listed.status_code, included)
    got = await client.get(detail, headers=actor.headers)
    if got.status_code == 200:
        assert got.json()["id"] == target
    return Outcome(got.status_code, included)


async def _status(response: httpx.Response) -> Outcome:
    return Outcome(response.status_code)


def g00(tree: OrgTree) -> str:
    return str(tree.groups[0][0].id)


OPS: dict[tuple[str, str], Op] = {
    ("organization", "read"): lambda c, t, a: _read(
        c, a, f"/api/organizations/{t.org.id}/", "/api/organizations/", str(t.org.id)
    ),
    ("organization", "create"): lambda c, t, a: _status_of(
        c.post("/api/organizations/", json={"name": "new"}, headers=a.headers)
    ),
    ("organization", "update"): lambda c, t, a: _status_of(
        c.patch(f"/api/organizations/{t.org.id}/", json={"name": "x"}, headers=a.headers)
    ),
    ("organization", "delete"): lambda c, t, a: _status_of(
        c.delete(f"/api/organizations/{t.org.id}/", headers=a.headers)
    ),
    ("settings", "read"): lambda c, t, a: _status_of(
        c.get(f"/api/organizations/{t.org.id}/settings/", headers=a.headers)
    ),
    ("settings", "update"): lambda c, t, a: _status_of(
        c.patch(f"/api/organizations/{t.org.id}/settings/", json={"location": "Bonn"}, headers=a.headers)
    ),
    ("project", "read"): lambda c, t, a: _read(
        c,
        a,
        f"/api/projects/{t.projects[0].id}/",
        f"/api/organizations/{t.org.id}/projects/",
        str(t.projects[0].id),
    ),
    ("project", "create"): lambda c, t, a: _status_of(
        c.post(f"/api/organizations/{t.org.id}/projects/", json={"name": "p"}, headers=a.headers)
    ),
    ("project", "update"): lambda c, t, a: _status_of(
        c.patch(f"/api/projects/{t.projects[0].id}/", json={"name": "p"}, headers=a.headers)
    ),
    ("project", "delete"): lambda c, t, a: _status_of(
        c.delete(f"/api/projects/{t.projects[0].id}/", headers=a.headers)
    ),
    ("group", "read"): lambda c, t, a: _read(c, a, f"/api/groups/{g00(t)}/", "/api/groups/", g00(t)),
    ("group", "create"): lambda c, t, a: _status_of(
        c.post(f"/api/projects/{t.projects[0].id}/groups/", json={"name": "g"}, headers=a.headers)
    ),
    ("group", "update"): lambda c, t, a: _status_of(
        c.patch(f"/api/groups/{g00(t)}/", json={"name": "g"}, headers=a.headers)
    ),
    ("group", "delete"): lambda c, t, a: _status_of(c.delete(f"/api/groups/{g00(t)}/", headers=a.headers)),
    ("user", "read"): lambda c, t, a: _read(
        c, a, f"/api/users/{t.member_one.id}/", "/api/users/?limit=1000", t.member_one.id
    ),
    ("user", "create"): lambda c, t, a: _status_of(
        c.post(
            "/api/users/",
            json={
                "username": f"newbie-{a.name}",
                "password": "long-password",
                "organization_id": str(t.org.id),
            },
            headers=a.headers,
        )
    ),
    ("user", "update"): lambda c, t, a: _status_of(
        c.patch(f"/api/users/{t.member_one.id}/", json={"first_name": "X"}, headers=a.headers)
    ),
    ("user", "delete"): lambda c, t, a: _status_of(
        c.delete(f"/api/users/{t.member_one.id}/", headers=a.headers)
    ),
    ("membership", "read"): lambda c, t, a: _read(
        c, a, None, f"/api/collections/{g00(t)}/members/", t.member_one.id
    ),
    ("membership", "create"): lambda c, t, a: _status_of(
        c.post(f"/api/collections/{g00(t)}/members/", json={"user_id": t.orphan.id}, headers=a.headers)
    ),
    ("membership", "delete"): lambda c, t, a: _removed(
        c.delete(f"/api/collections/{g00(t)}/members/{t.member_one.id}/", headers=a.headers)
    ),
    ("role", "read"): lambda c, t, a: _read_role(c, t, a),
    ("role", "create"): lambda c, t, a: _status_of(
        c.post(
            f"/api/collections/{g00(t)}/roles/",
            json={"user_id": t.member_all.id, "kind": "coach"},
            headers=a.headers,
        )
    ),
    ("role", "delete"): lambda c, t, a: _removed(
        c.delete(f"/api/collections/{g00(t)}/roles/{t.group_coach.id}/coach/", headers=a.headers)
    ),
    ("invitation", "read"): lambda c, t, a: _read(
        c, a, None, f"/api/organizations/{t.org.id}/invitations/", t.invitation_id
    ),  # type: ignore[attr-defined]
    ("invitation", "create"): lambda c, t, a: _status_of(
        c.post(f"/api/organizations/{t.org.id}/invitations/", json={}, headers=a.headers)
    ),
    ("invitation", "delete"): lambda c, t, a: _status_of(
        c.delete(f"/api/organizations/{t.org.id}/invitations/{t.invitation_id}/", headers=a.headers)
    ),  # type: ignore[attr-defined]
    ("model", "read"): lambda c, t, a: _read(
        c, a, f"/api/models/{t.model_id}/info/", "/api/models/", t.model_id
    ),  # type: ignore[attr-defined]
    ("model", "create"): lambda c, t, a: _status_of(
        c.post(
            "/api/models/",
            data={"name": "n", "description": ""},
            files={"model_file": ("m.pt", _scripted())},
            headers=a.headers,
        )
    ),
    ("model", "update"): lambda c, t, a: _status_of(
        c.post(
            f"/api/models/{t.model_id}/preprocessing/",
            files={"model_preprocessing_file": ("p.pt", _scripted())},
            headers=a.headers,
        )
    ),  # type: ignore[attr-defined]
    ("model", "delete"): lambda c, t, a: _status_of(
        c.delete(f"/api/models/{t.model_id}/", headers=a.headers)
    ),  # type: ignore[attr-defined]
    ("metric", "read"): lambda c, t, a: _read(c, a, None, f"/api/models/{t.model_id}/metrics/", t.metric_id),  # type: ignore[attr-defined]
    ("metric", "create"): lambda c, t, a: _status_of(
        c.post(
            f"/api/models/{t.model_id}/metrics/",
            data={"metric_names": ["m"], "metric_values": ["1"]},
            headers=a.headers,
        )
    ),  # type: ignore[attr-defined]
    ("training", "read"): lambda c, t, a: _read(
        c, a, f"/api/trainings/{t.training_id}/", "/api/trainings/", t.training_id
    ),  # type: ignore[attr-defined]
    ("training", "create"): lambda c, t, a: _status_of(
        c.post(
            "/api/trainings/",
            json={
                "model_id": t.model_id,
                "target_num_updates": 1,
                "aggregation_method": "FedAvg",
                "metric_names": ["m"],
                "clients": [t.member_one.id],
            },
            headers=a.headers,
        )
    ),  # type: ignore[attr-defined]
    ("training", "update"): lambda c, t, a: _status_of(
        c.put(
            f"/api/trainings/{t.training_id}/clients/", json={"clients": [t.member_all.id]}, headers=a.headers
        )
    ),  # type: ignore[attr-defined]
    ("training", "delete"): lambda c, t, a: _status_of(
        c.delete(f"/api/trainings/{t.training_id}/", headers=a.headers)
    ),  # type: ignore[attr-defined]
    ("topic", "read"): lambda c, t, a: _read(
        c, a, f"/api/broker/topics/{t.topic}/", "/api/broker/topics/", t.topic_id
    ),  # type: ignore[attr-defined]
    ("topic", "create"): lambda c, t, a: _status_of(
        c.post("/api/broker/topics/", json={"slug": f"new-{t.org.name}-{a.name}"}, headers=a.headers)
    ),
    ("topic", "update"): lambda c, t, a: _status_of(
        c.patch(f"/api/broker/topics/{t.topic}/", json={"store_messages": "cache"}, headers=a.headers)
    ),  # type: ignore[attr-defined]
    ("topic", "delete"): lambda c, t, a: _status_of(
        c.delete(f"/api/broker/topics/{t.topic}/", headers=a.headers)
    ),  # type: ignore[attr-defined]
    ("org_money", "read"): lambda c, t, a: _status_of(
        c.get(f"/api/organizations/{t.org.id}/billing/balance/", headers=a.headers)
    ),
    ("org_money", "create"): lambda c, t, a: _status_of(
        c.post(f"/api/organizations/{t.org.id}/billing/top-ups/", json={"amount": "1"}, headers=a.headers)
    ),
    ("org_money", "update"): lambda c, t, a: _status_of(
        c.put(
            f"/api/organizations/{t.org.id}/billing/limits/{t.member_one.id}/",
            json={"amount": "5"},
            headers=a.headers,
        )
    ),
    ("org_audit", "read"): lambda c, t, a: _status_of(
        c.get(f"/api/organizations/{t.org.id}/billing/audit-log/", headers=a.headers)
    ),
    ("org_spending", "read"): lambda c, t, a: _status_of(
        c.get(f"/api/organizations/{t.org.id}/billing/members/{t.member_one.id}/spending/", headers=a.headers)
    ),
}


_SCRIPTED: list[bytes] = []


def _scripted() -> bytes:
    """A TorchScript archive (model and preprocessing uploads), built once."""
    if not _SCRIPTED:
        import io

        import torch

        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), buffer)
        _SCRIPTED.append(buffer.getvalue())
    return _SCRIPTED[0]


async def _resources(app: Any, tree: OrgTree) -> None:
    """The organisation's model, training, metric and topic the resource rows of MATRIX act on."""
    coach, member = tree.project_coach.user, tree.member_one.user
    weights = await open_store(app.state.settings).put(_scripted())
    async with app.state.sessionmaker() as session:
        model = GlobalModel(
            owner_id=coach.id,
            name="matrix",
            weights_digest=weights.digest,
            weights_format="torchscript",
            weights_size=len(_scripted()),
        )
        topic = BrokerTopic(slug=f"topic-{tree.org.name}", owner_id=coach.id, api_info={})
        session.add_all([model, topic])
        await session.flush()
        training = Training(
            model_id=model.id,
            actor_id=coach.id,
            target_num_updates=1,
            options={},
            metric_names=[],
            participants=[await session.get(User, member.id)],
        )
        metric = Metric(model_id=model.id, key="acc", value_float=0.5, reporter_id=member.id)
        session.add_all(
            [training, metric, BrokerTopicGrant(topic_id=topic.id, user_id=member.id, can_consume=True)]
        )
        await session.commit()
        tree.__dict__.update(
            model_id=str(model.id),
            training_id=str(training.id),
            metric_id=str(metric.id),
            topic=topic.slug,
            topic_id=str(topic.id),
        )


async def _status_of(request: Awaitable[httpx.Response]) -> Outcome:
    response = await request
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) >= {"detail", "code"}
    return Outcome(response.status_code)


async def _removed(request: Awaitable[httpx.Response]) -> Outcome:
    response = await request
    if response.status_code == 200:
        assert response.json() == {"removed": True}
    return Outcome(response.status_code)


async def _read_role(client: httpx.AsyncClient, tree: OrgTree, actor: Actor) -> Outcome:
    response = await client.get(f"/api/collections/{g00(tree)}/roles/", headers=actor.headers)
    held = response.status_code == 200 and any(
        r["user_id"] == tree.group_coach.id and r["kind"] == "coach" for r in response.json()
    )
    return Outcome(response.status_code, held)


async def _fresh_tree(app: Any, prefix: str, other_admin: Actor | None = None) -> OrgTree:
    tree = await build_org_tree(app, prefix, second=other_admin is None)
    if other_admin is not None:
        tree.actors["other_admin"] = other_admin
    async with app.state.sessionmaker() as session:
        row, _ = await create_invitation(
            session, tree.org.id, by=None, expires_in=dt.timedelta(days=1), max_uses=None, note=""
        )
        await session.commit()
    tree.__dict__["invitation_id"] = str(row.id)
    await _resources(app, tree)
    return tree


# Operations whose success changes what the next actor would meet (the others rename, create
# something new or are idempotent, so one tree serves every actor).
CONSUMING = {("membership", "create"), ("role", "create"), ("training", "update")} | {
    (k, "delete") for k, _ in MATRIX
} - {
    ("organization", "delete"),  # refused with 409 while users remain: nothing is deleted
    ("invitation", "delete"),  # revoking twice is fine
}


KINDS = list(dict.fromkeys(kind for kind, _ in MATRIX))


@pytest.mark.parametrize("kind", KINDS)
async def test_permission_matrix(app, client, kind: str) -> None:
    """Every operation on one resource kind, for every actor (one test per kind keeps the
    per-test database set-up from dominating the run time)."""
    mismatches = []
    other_admin: Actor | None = None  # the second organisation is built once: no operation changes it
    for operation in ("read", "update", "create", "delete"):
        if (kind, operation) not in MATRIX:
            continue
        expected = dict(zip(ACTORS, MATRIX[(kind, operation)].split(), strict=True))
        tree = await _fresh_tree(app, f"{operation}0", other_admin=other_admin)
        other_admin = tree.actors["other_admin"]
        for number, actor_name in enumerate(ACTORS):
            outcome = await OPS[(kind, operation)](client, tree, tree.actors[actor_name])
            if str(outcome) != expected[actor_name]:
                mismatches.append(
                    f"{operation} by {actor_name}: expected {expected[actor_name]}, got {outcome}"
                )
            if operation == "read" and outcome.status in (401, 403, 404):
                assert not outcome.listed, f"{actor_name} may not read the {kind} but the list shows it"
            if (kind, operation) in CONSUMING and outcome.status < 300:
                # A tree of its own for the next actor, next to the old one (same other organisation).
                tree = await _fresh_tree(
                    app, f"{operation}{number + 1}", other_admin=tree.actors["other_admin"]
                )
    assert not mismatches, f"{kind}:\n  " + "\n  ".join(mismatches)
