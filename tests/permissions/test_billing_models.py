"""Billing on a model follows the model policy (``billing.dependencies``): its report and its
market pricing belong to those who may update the model (owner, the organisation's admins,
superusers); the pricing is readable by whoever may read the model, and by everyone once the
model is published on the inference market. Everyone else gets a 404."""

from __future__ import annotations

from typing import Any

from flplatform.orm import GlobalModel
from tests.permissions.conftest import OrgTree


async def _model(app: Any, tree: OrgTree) -> str:
    async with app.state.sessionmaker() as session:
        model = GlobalModel(
            owner_id=tree.project_coach.user.id, name="priced", weights_size=0, organization_id=tree.org.id
        )
        session.add(model)
        await session.commit()
        return str(model.id)


async def test_report_and_pricing_follow_the_model_policy(app, client, tree) -> None:
    model_id = await _model(app, tree)
    report, pricing = f"/api/billing/models/{model_id}/report/", f"/api/billing/models/{model_id}/pricing/"
    managers = (tree.project_coach, tree.org_admin, tree.superuser)
    outsiders = (tree.member_one, tree.orphan, tree.other_admin)
    for actor in managers:
        assert (await client.get(report, headers=actor.headers)).status_code == 200, actor.name
    for actor in outsiders:
        assert (await client.get(report, headers=actor.headers)).status_code == 404, actor.name
        refused = await client.put(
            pricing, json={"inference_public": True, "inference_price_per_sample": "1"}, headers=actor.headers
        )
        assert refused.status_code == 404, actor.name
        assert (await client.get(pricing, headers=actor.headers)).status_code == 404, actor.name
    published = await client.put(
        pricing,
        json={"inference_public": True, "inference_price_per_sample": "1"},
        headers=tree.org_admin.headers,
    )
    assert published.status_code == 200 and published.json()["inference_public"] is True
    for actor in outsiders:  # the market's one deliberate exposure: the price of a published model
        seen = await client.get(pricing, headers=actor.headers)
        assert seen.status_code == 200 and seen.json()["inference_price_per_sample"] == "1.00000000", (
            actor.name
        )
        assert (await client.get(report, headers=actor.headers)).status_code == 404, actor.name
