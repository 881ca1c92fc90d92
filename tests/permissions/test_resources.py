"""Models, trainings, metrics and broker topics inside organisations, over HTTP: who creates,
reads, manages and deletes (the permission table in docs/permissions.md), 403 for visible objects the caller
may not change, 404 for objects they may not see, and the participant rules of training creation
(a role for every participant, nobody from another organisation)."""

from __future__ import annotations

import io
from typing import Any

import torch

from tests.permissions.conftest import build_org_tree


def _scripted() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), buffer)
    return buffer.getvalue()


async def test_models_trainings_metrics_and_topics_in_an_organisation(app, client) -> None:
    tree = await build_org_tree(app, "r")
    a = tree.actors
    weights = _scripted()
    problems: list[str] = []

    async def expect(status: int, method: str, url: str, who: str, **kw: Any) -> Any:
        response = await client.request(method, url, headers=a[who].headers, **kw)
        if response.status_code != status:
            problems.append(
                f"{method} {url} as {who}: expected {status}, got {response.status_code} {response.text[:100]}"
            )
        return response

    async def upload(who: str) -> str:
        r = await expect(
            201,
            "POST",
            "/api/models/",
            who,
            data={"name": f"{who}-net", "description": ""},
            files={"model_file": ("m.pt", weights)},
        )
        return r.json()["model_id"]

    def training(model: str, clients: list[str]) -> dict[str, Any]:
        return {
            "json": {
                "model_id": model,
                "target_num_updates": 1,
                "aggregation_method": "FedAvg",
                "metric_names": ["acc"],
                "clients": clients,
            }
        }

    coach_model, member_model, group_model = (
        await upload("project_coach"),
        await upload("member_one"),
        await upload("group_coach"),
    )
    # reading a model: owner, organisation admins; nobody else yet
    for who, status in (
        ("project_coach", 200),
        ("org_admin", 200),
        ("member_one", 404),
        ("orphan", 404),
        ("other_admin", 404),
        ("superuser", 200),
    ):
        await expect(status, "GET", f"/api/models/{coach_model}/info/", who)
    # creating trainings: a role for every participant, participants from the organisation
    r = await expect(
        201, "POST", "/api/trainings/", "project_coach", **training(coach_model, [a["member_one"].id])
    )
    assert r.status_code == 201, problems
    tid = r.json()["training_id"]
    r = await expect(
        403, "POST", "/api/trainings/", "project_coach", **training(coach_model, [a["orphan"].id])
    )
    assert r.json()["code"] == "no_role_for_participant"
    r = await expect(
        400, "POST", "/api/trainings/", "project_coach", **training(coach_model, [a["other_admin"].id])
    )
    assert r.json()["code"] == "participant_outside_organization"
    r = await expect(403, "POST", "/api/trainings/", "member_one", **training(member_model, []))
    assert r.json()["code"] == "no_role"
    await expect(201, "POST", "/api/trainings/", "group_coach", **training(group_model, [a["member_all"].id]))
    await expect(
        403, "POST", "/api/trainings/", "group_coach", **training(group_model, [a["project_coach"].id])
    )
    await expect(404, "POST", "/api/trainings/", "other_admin", **training(coach_model, []))
    # reading the training and its model: actor, participants, organisation admins
    for who, status in (
        ("project_coach", 200),
        ("member_one", 200),
        ("org_admin", 200),
        ("member_all", 404),
        ("group_coach", 404),
        ("other_admin", 404),
    ):
        await expect(status, "GET", f"/api/trainings/{tid}/", who)
        await expect(status, "GET", f"/api/models/{coach_model}/info/", who)
    listed = {t["id"] for t in (await expect(200, "GET", "/api/trainings/", "org_admin")).json()}
    assert tid in listed and len(listed) == 2  # admins oversee every training of the organisation
    assert [t["id"] for t in (await expect(200, "GET", "/api/users/trainings/", "member_one")).json()] == [
        tid
    ]
    assert (await expect(200, "GET", "/api/trainings/", "other_admin")).json() == []
    # managing: the actor and organisation admins; participants see it (403), others do not (404)
    await expect(403, "POST", f"/api/trainings/{tid}/start/", "member_one")
    await expect(404, "POST", f"/api/trainings/{tid}/start/", "other_admin")
    await expect(404, "PUT", f"/api/trainings/{tid}/clients/", "orphan", json={"clients": [a["orphan"].id]})
    await expect(
        202, "PUT", f"/api/trainings/{tid}/clients/", "org_admin", json={"clients": [a["orphan"].id]}
    )
    await expect(202, "POST", f"/api/trainings/{tid}/stop/", "org_admin")
    # metrics follow the model
    await expect(
        201,
        "POST",
        f"/api/models/{coach_model}/metrics/",
        "member_one",
        data={"metric_names": ["acc"], "metric_values": ["0.5"]},
    )
    await expect(
        404,
        "POST",
        f"/api/models/{coach_model}/metrics/",
        "member_all",
        data={"metric_names": ["acc"], "metric_values": ["0.5"]},
    )
    metrics = (await expect(200, "GET", f"/api/models/{coach_model}/metrics/", "org_admin")).json()
    assert [m["key"] for m in metrics] == ["acc"]
    await expect(404, "GET", f"/api/models/{coach_model}/metrics/", "other_admin")
    # deleting a model: owner or admin; a participant sees it but may not (403)
    await expect(403, "DELETE", f"/api/models/{coach_model}/", "member_one")
    await expect(404, "DELETE", f"/api/models/{member_model}/", "other_admin")
    await expect(200, "DELETE", f"/api/models/{member_model}/", "org_admin")
    # topics: an organisation's topics stay in it
    await expect(201, "POST", "/api/broker/topics/", "project_coach", json={"slug": "r-private"})
    r = await expect(
        400,
        "PUT",
        "/api/broker/topics/r-private/grants/rx-org_admin/",
        "project_coach",
        json={"can_consume": True},
    )
    assert r.json()["code"] == "grant_outside_organization"
    await expect(
        200,
        "PUT",
        "/api/broker/topics/r-private/grants/r-member_one/",
        "project_coach",
        json={"can_consume": True},
    )
    for who, status in (("member_one", 200), ("org_admin", 200), ("member_all", 404), ("other_admin", 404)):
        await expect(status, "GET", "/api/broker/topics/r-private/", who)
    await expect(403, "PATCH", "/api/broker/topics/r-private/", "member_one", json={"is_public": True})
    await expect(200, "PATCH", "/api/broker/topics/r-private/", "org_admin", json={"is_public": True})
    await expect(200, "GET", "/api/broker/topics/r-private/", "member_all")  # public inside the organisation
    await expect(404, "GET", "/api/broker/topics/r-private/", "other_admin")  # never outside it
    assert (await expect(200, "GET", "/api/broker/topics/", "other_admin")).json() == []
    assert not problems, "\n  ".join(["unexpected answers:", *problems])
