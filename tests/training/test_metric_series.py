"""Metric series of a training (``GET /api/trainings/{id}/metrics/``) against hand-computed means,
and the model metrics route's filters and pages, on both databases."""

from __future__ import annotations

from typing import Any

import pytest

from tests.training.conftest import (
    as_safetensors,
    create_training,
    post_update,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
    upload_global,
)
from tests.training.test_lifecycle_api import wait_training


async def _post_test_metrics(client: Any, account: Any, model_id: str, value: float) -> None:
    r = await client.post(
        f"/api/models/{model_id}/metrics/",
        headers=account.headers,
        data={"metric_names": ["accuracy", "note"], "metric_values": [str(value), "not a number"]},
    )
    assert r.status_code == 201, r.text


@pytest.fixture
async def ran(client, alice, make_user) -> dict[str, Any]:
    """Two rounds with test rounds: update metrics (loss, sample sizes 30/10 then 30/20) and test
    accuracies (0.7/0.9 then 0.8/1.0)."""
    c1 = await make_user("c1", client=True)
    c2 = await make_user("c2", client=True)
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(client, alice.headers, model_id, [c1.id, c2.id])
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    state = state_of(initial)
    plan = [((0.5, 30, 0.6), (1.0, 10, None), (0.7, 0.9)), ((0.25, 30, None), (0.75, 20, None), (0.8, 1.0))]
    for round_, (first, second, tests) in enumerate(plan):
        for account, (loss, size, accuracy) in ((c1, first), (c2, second)):
            metrics: dict[str, Any] = {"loss": loss}
            if accuracy is not None:
                metrics["accuracy"] = accuracy
            r = await post_update(
                client, account.headers, model_id, as_safetensors(shifted(state, 0.1)), round_, size, metrics
            )
            assert r.status_code == 201, r.text
        await wait_training(client, alice.headers, training_id, lambda b: b["phase"] == "test")
        for account, value in zip((c1, c2), tests, strict=True):
            await _post_test_metrics(client, account, model_id, value)
        await wait_training(
            client,
            alice.headers,
            training_id,
            lambda b, r=round_: b["state"] == "C" or (b["phase"] == "update" and b["round"] == r + 1),
        )
    return {"training": training_id, "model": model_id, "c1": c1, "c2": c2}


def _aggregates(points: list[dict[str, Any]], source: str) -> dict[int, float]:
    return {p["round"]: p["value"] for p in points if p["reporter"] is None and p["source"] == source}


async def test_series_against_hand_computed_means(client, alice, ran) -> None:
    url = f"/api/trainings/{ran['training']}/metrics/"
    r = await client.get(url, headers=alice.headers)
    assert r.status_code == 200, r.text
    series = r.json()
    assert set(series) == {"loss", "accuracy"}  # "note" is not numeric
    loss = _aggregates(series["loss"], "update")
    assert loss == pytest.approx({0: (0.5 * 30 + 1.0 * 10) / 40, 1: (0.25 * 30 + 0.75 * 20) / 50})
    first = next(p for p in series["loss"] if p["reporter"] is None and p["round"] == 0)
    assert first["weighted"] is True and first["count"] == 2 and first["sample_size"] == 40
    # test metrics: the global model of rounds 1 and 2, plain means
    assert _aggregates(series["accuracy"], "test") == pytest.approx({1: 0.8, 2: 0.9})
    assert _aggregates(series["accuracy"], "update") == pytest.approx({0: 0.6})
    participants = [p for p in series["accuracy"] if p["reporter"] is not None and p["source"] == "test"]
    assert sorted((p["round"], p["reporter"], p["value"]) for p in participants) == sorted(
        [(1, ran["c1"].id, 0.7), (1, ran["c2"].id, 0.9), (2, ran["c1"].id, 0.8), (2, ran["c2"].id, 1.0)]
    )
    # each list is ordered by round, the aggregate before the round's points
    rounds = [p["round"] for p in series["loss"]]
    assert rounds == sorted(rounds) and series["loss"][0]["reporter"] is None

    # filters
    only = (await client.get(url, params={"name": "loss", "round_from": 1}, headers=alice.headers)).json()
    assert list(only) == ["loss"] and {p["round"] for p in only["loss"]} == {1}
    upto = (await client.get(url, params={"round_to": 1}, headers=alice.headers)).json()
    assert {p["round"] for p in upto["accuracy"]} == {0, 1}
    both = (
        await client.get(url, params=[("name", "loss"), ("name", "accuracy")], headers=alice.headers)
    ).json()
    assert set(both) == {"loss", "accuracy"}
    assert (await client.get(url, params={"name": "nope"}, headers=alice.headers)).json() == {}
    assert (await client.get(url, params={"round_from": -1}, headers=alice.headers)).status_code == 422


async def test_participants_read_the_series_strangers_do_not(client, alice, ran, make_user) -> None:
    url = f"/api/trainings/{ran['training']}/metrics/"
    # participants may read each other's updates (the model policy: FedDC passes them on), so they
    # see the actor's series
    assert (await client.get(url, headers=ran["c1"].headers)).json() == (
        await client.get(url, headers=alice.headers)
    ).json()
    stranger = await make_user("stranger", client=True)
    r = await client.get(url, headers=stranger.headers)
    assert r.status_code in (403, 404) and "accuracy" not in r.text
    assert (await client.get(url)).status_code == 401
    missing = await client.get(
        "/api/trainings/00000000-0000-0000-0000-000000000000/metrics/", headers=alice.headers
    )
    assert missing.status_code == 404


async def test_model_metrics_filters_and_pages(client, alice, ran) -> None:
    url = f"/api/models/{ran['model']}/metrics/"
    r = await client.get(url, headers=alice.headers)
    assert r.status_code == 200 and r.headers["X-Total-Count"] == "8"  # 2 rounds x 2 clients x 2 keys
    everything = r.json()
    r = await client.get(url, params={"key": "accuracy"}, headers=alice.headers)
    assert r.headers["X-Total-Count"] == "4" and {m["key"] for m in r.json()} == {"accuracy"}
    r = await client.get(url, params={"key": "accuracy", "step": 2}, headers=alice.headers)
    assert sorted(m["value_float"] for m in r.json()) == [0.8, 1.0]
    r = await client.get(url, params={"reporter": ran["c2"].id, "key": "accuracy"}, headers=alice.headers)
    assert sorted(m["value_float"] for m in r.json()) == [0.9, 1.0]
    pages = []
    for offset in (0, 3, 6):
        r = await client.get(url, params={"limit": 3, "offset": offset}, headers=alice.headers)
        assert r.headers["X-Total-Count"] == "8"
        pages += r.json()
    assert [m["id"] for m in pages] == [m["id"] for m in everything]
    assert (await client.get(url, params={"limit": 0}, headers=alice.headers)).status_code == 422
