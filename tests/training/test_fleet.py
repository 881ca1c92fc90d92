"""Federations of many clients (issue 18, items 1-3): participants by collection, a seeded and
recorded client selection per round, and client liveness (HTTP heartbeats, broker pongs, dropping
clients offline too long). Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import uuid
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import select, update

from flplatform.client.api import FLPlatformAPI
from flplatform.orm import BrokerTopic, ClientHeartbeat, Membership, Notification, TrainingEvent
from flplatform.orm.base import utcnow
from flplatform.settings import Settings
from flplatform.trainings.selection import sample_size
from tests.broker.conftest import recv_json, serve_live
from tests.permissions.conftest import build_org_tree
from tests.training.conftest import (
    as_safetensors,
    create_training,
    fedavg,
    post_update,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
    upload_global,
)
from tests.training.test_lifecycle_api import wait_training


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        notification_backoff_seconds=0.01,
        notification_max_attempts=2,
        notification_timeout_seconds=2.0,
        training_sweep_interval_seconds=0.05,
        client_offline_after_seconds=60.0,
        client_drop_after_seconds=120.0,
    )


async def _notified(app: Any, training_id: str, kind: str) -> dict[int, set[str]]:
    """Round → recipients of the ``kind`` notifications of the training."""
    async with app.state.sessionmaker() as session:
        rows = (
            await session.execute(
                select(Notification.recipient_id, Notification.payload).where(
                    Notification.training_id == uuid.UUID(training_id),
                    Notification.notification_type == kind,
                )
            )
        ).all()
    out: dict[int, set[str]] = {}
    for recipient, payload in rows:
        out.setdefault(json.loads(payload)["body"]["round"], set()).add(str(recipient))
    return out


def _at(round_: int) -> Any:
    """The detail shows round ``round_`` begun: the global model's round (read apart from the
    training row, so a read may catch one committed and not the other) and the training's
    selection for it."""
    return lambda b: b["round"] == round_ and b["selection_round"] == round_


def _expected_draw(seed: Any, round_: int, users: list[Any], k: int) -> set[str]:
    """The documented draw, computed independently: seeded sample over username order."""
    ordered = sorted(users, key=lambda a: (a.user.username, a.user.id))
    return {a.id for a in random.Random(f"{seed}:clients:{round_}").sample(ordered, k)}


def test_sample_size_counts_and_fractions() -> None:
    assert sample_size({}, 7) == 7
    assert sample_size({"clients_per_round": 3}, 7) == 3
    assert sample_size({"clients_per_round": 30}, 7) == 7
    assert sample_size({"clients_per_round": 0.1}, 200) == 20
    assert sample_size({"clients_per_round": 0.1}, 15) == 2  # rounded up
    assert sample_size({"clients_per_round": 0.1, "min_clients_per_round": 5}, 15) == 5
    assert sample_size({"clients_per_round": 1.0}, 4) == 4


async def test_clients_per_round_is_validated(client, alice, make_user) -> None:
    c1 = await make_user("v1", client=True)
    model_id = await upload_global(client, alice.headers)
    for bad in (0, -1, 1.5, 0.0, "a"):
        r = await client.post(
            "/api/trainings/",
            headers=alice.headers,
            json={
                "model_id": model_id,
                "target_num_updates": 1,
                "aggregation_method": "FedAvg",
                "clients": [c1.id],
                "options": {"clients_per_round": bad},
            },
        )
        assert r.status_code == 422, (bad, r.text)


async def test_sampling_asks_a_seeded_recorded_subset_and_aggregates_over_it(app, client, alice, make_user):
    clients = [await make_user(f"s{i}", client=True) for i in range(5)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        options={"clients_per_round": 2, "seed": 7, "skip_model_tests": True, "min_quorum": 1},
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    state = state_of(initial)
    for round_ in range(2):
        expected = _expected_draw(7, round_, clients, 2)
        detail = await wait_training(client, alice.headers, training_id, _at(round_))
        assert detail["phase"] == "update"
        assert detail["local_models_expected"] == 2
        assert {p["id"] for p in detail["participant_status"] if p["selected"]} == expected
        assert len(detail["participant_status"]) == 5
        # only the selected clients are asked
        assert (await _notified(app, training_id, "UPDATE_ROUND_START"))[round_] == expected
        by_id = {c.id: c for c in clients}
        outsider = next(c for c in clients if c.id not in expected)
        r = await post_update(
            client, outsider.headers, model_id, as_safetensors(shifted(state, 50.0)), round_, 99
        )
        assert r.status_code == 201, r.text  # stored, but not part of the round
        states, sizes = [], []
        for n, cid in enumerate(sorted(expected)):
            s = shifted(state, 1.0 + n)
            r = await post_update(client, by_id[cid].headers, model_id, as_safetensors(s), round_, 10 + n)
            assert r.status_code == 201, r.text
            states.append(s)
            sizes.append(10 + n)
        await wait_training(client, alice.headers, training_id, lambda b, r=round_: (b["round"] or 0) > r)
        state = fedavg(states, sizes)
        got = state_of((await client.get(f"/api/models/{model_id}/", headers=alice.headers)).content)
        for key in state:
            assert torch.allclose(got[key].to(torch.float64), state[key].to(torch.float64), atol=1e-5), key
    await wait_training(client, alice.headers, training_id, lambda b: b["state"] == "C")
    r = await client.get(f"/api/trainings/{training_id}/rounds/", headers=alice.headers)
    assert r.status_code == 200 and r.headers["X-Total-Count"] == "2"
    rounds = r.json()
    assert [x["round"] for x in rounds] == [1, 0]
    for entry in rounds:
        assert set(entry["selected"]) == _expected_draw(7, entry["round"], clients, 2)
        assert set(entry["answered"]) == set(entry["selected"])  # the outsider's upload does not count
        assert entry["dropped"] == []
    # a participant reads the rounds too; a stranger does not
    assert (
        await client.get(f"/api/trainings/{training_id}/rounds/", headers=clients[0].headers)
    ).status_code == 200
    stranger = await make_user("stranger", client=True)
    assert (
        await client.get(f"/api/trainings/{training_id}/rounds/", headers=stranger.headers)
    ).status_code in (
        403,
        404,
    )


async def test_feddc_keeps_its_daisy_chain_over_the_selected_clients(app, client, alice, make_user):
    clients = [await make_user(f"d{i}", client=True) for i in range(4)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        aggregation_method="FedDC",
        target_num_updates=2,
        options={
            "daisy_chain_period": 1,
            "aggregation_period": 2,
            "skip_model_tests": True,
            "clients_per_round": 2,
            "seed": 3,
        },
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    chain = _expected_draw(3, 0, clients, 2)
    by_id = {c.id: c for c in clients}
    state = state_of(initial)
    for cid in sorted(chain):
        r = await post_update(client, by_id[cid].headers, model_id, as_safetensors(shifted(state, 1.0)), 0)
        assert r.status_code == 201, r.text
    detail = await wait_training(client, alice.headers, training_id, _at(1))
    # the daisy-chain round asks the same clients, each with the other's local model
    assert {p["id"] for p in detail["participant_status"] if p["selected"]} == chain
    assert (await _notified(app, training_id, "UPDATE_ROUND_START"))[1] == chain
    rounds = (await client.get(f"/api/trainings/{training_id}/rounds/", headers=alice.headers)).json()
    assert [set(x["selected"]) for x in rounds] == [chain, chain]
    for cid in sorted(chain):
        r = await post_update(client, by_id[cid].headers, model_id, as_safetensors(shifted(state, 2.0)), 1)
        assert r.status_code == 201, r.text
    final = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
    assert final["state"] == "C", final


async def test_participants_by_collection(app, client) -> None:
    tree = await build_org_tree(app, "fc")
    a = tree.actors
    coach = a["project_coach"]  # coaches projects[0]; member_one and member_all are its members
    model_id = await upload_global(client, coach.headers)
    project = str(tree.projects[0].id)

    async def create(who: Any, collections: list[str], **options: Any) -> Any:
        return await client.post(
            "/api/trainings/",
            headers=who.headers,
            json={
                "model_id": model_id,
                "target_num_updates": 2,
                "aggregation_method": "FedAvg",
                "collections": collections,
                "options": {"skip_model_tests": True, **options},
            },
        )

    # the rules of explicit participants: collections the creator can see, of its organisation,
    # projects and groups only
    r = await create(coach, [str(tree.projects[1].id)])
    assert r.status_code == 404 and r.json()["code"] == "collection_not_found", r.text
    r = await create(coach, [str(tree.other.projects[0].id)])
    assert r.status_code == 404, r.text
    r = await create(coach, [str(tree.org.id)])
    assert r.status_code in (400, 404), r.text
    r = await create(a["group_coach"], [project])
    assert r.status_code in (403, 404), r.text

    r = await create(coach, [project], collections_each_round=True)
    assert r.status_code == 201, r.text
    each_round = r.json()["training_id"]
    detail = (await client.get(f"/api/trainings/{each_round}/", headers=coach.headers)).json()
    assert detail["collections"] == [project] and detail["participants"] == []
    model_2 = (await client.get(f"/api/trainings/{each_round}/", headers=coach.headers)).json()["model"]
    r = await client.post(f"/api/trainings/{each_round}/start/", headers=coach.headers)
    assert r.status_code == 202, r.text
    members = {a["member_one"].id, a["member_all"].id}
    detail = await wait_training(client, coach.headers, each_round, lambda b: b["phase"] == "update")
    assert set(detail["participants"]) == members
    assert {p["id"] for p in detail["participant_status"] if p["selected"]} == members
    # someone joins the project during round 0: they take part from round 1
    async with app.state.sessionmaker() as session:
        session.add(Membership(user_id=a["orphan"].user.id, collection_id=tree.projects[0].id))
        await session.commit()
    state = state_of(scripted_bytes(tiny_net()))
    for who in ("member_one", "member_all"):
        r = await post_update(client, a[who].headers, model_2, as_safetensors(shifted(state, 1.0)), 0)
        assert r.status_code == 201, r.text
    detail = await wait_training(client, coach.headers, each_round, _at(1))
    assert set(detail["participants"]) == members | {a["orphan"].id}
    assert detail["local_models_expected"] == 3
    assert (await _notified(app, each_round, "UPDATE_ROUND_START"))[1] == members | {a["orphan"].id}


async def test_collections_resolved_only_at_start_by_default(app, client) -> None:
    tree = await build_org_tree(app, "fs", second=False)
    a = tree.actors
    coach = a["project_coach"]
    model_id = await upload_global(client, coach.headers)
    r = await client.post(
        "/api/trainings/",
        headers=coach.headers,
        json={
            "model_id": model_id,
            "target_num_updates": 2,
            "aggregation_method": "FedAvg",
            "collections": [str(tree.groups[0][0].id)],
            "clients": [a["member_all"].id],
            "options": {"skip_model_tests": True},
        },
    )
    assert r.status_code == 201, r.text
    tid = r.json()["training_id"]
    await client.post(f"/api/trainings/{tid}/start/", headers=coach.headers)
    async with app.state.sessionmaker() as session:
        session.add(Membership(user_id=a["orphan"].user.id, collection_id=tree.groups[0][0].id))
        await session.commit()
    state = state_of(scripted_bytes(tiny_net()))
    for who in ("member_one", "member_all"):
        r = await post_update(client, a[who].headers, model_id, as_safetensors(shifted(state, 1.0)), 0)
        assert r.status_code == 201, r.text
    detail = await wait_training(client, coach.headers, tid, _at(1))
    assert set(detail["participants"]) == {a["member_one"].id, a["member_all"].id}


async def test_heartbeats_and_broker_pongs_give_liveness(app, client, alice, make_user) -> None:
    c1, c2, c3 = [await make_user(f"h{i}", client=True) for i in range(3)]
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(client, alice.headers, model_id, [c1.id, c2.id, c3.id])
    # before the start: a participant may beat; it is not selected (nothing runs yet)
    r = await client.post(f"/api/trainings/{training_id}/heartbeat/", headers=c1.headers)
    assert r.status_code == 200, r.text
    assert r.json()["selected"] is False and r.json()["state"] == "I"
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    r = await client.post(f"/api/trainings/{training_id}/heartbeat/", headers=c1.headers)
    assert r.status_code == 200 and r.json()["selected"] is True and r.json()["round"] == 0
    # the actor is no participant; a stranger does not see the training
    r = await client.post(f"/api/trainings/{training_id}/heartbeat/", headers=alice.headers)
    assert r.status_code == 403 and r.json()["code"] == "not_a_participant"
    stranger = await make_user("h-stranger", client=True)
    assert (
        await client.post(f"/api/trainings/{training_id}/heartbeat/", headers=stranger.headers)
    ).status_code in (
        403,
        404,
    )
    assert (
        await client.post(f"/api/trainings/{uuid.uuid4()}/heartbeat/", headers=c1.headers)
    ).status_code == 404
    # c2 was heard from an hour ago; c3 serves a broker topic that answered the last ping
    async with app.state.sessionmaker() as session:
        session.add(ClientHeartbeat(user_id=c2.user.id, last_seen_at=utcnow() - dt.timedelta(hours=1)))
        session.add(BrokerTopic(slug="h-topic", owner_id=c3.user.id, last_ping=utcnow(), last_pong=utcnow()))
        await session.commit()
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    status = {p["username"]: p for p in detail["participant_status"]}
    assert status["h0"]["liveness"] == "online" and status["h0"]["last_seen"]
    assert status["h1"]["liveness"] == "offline"
    assert status["h2"]["liveness"] == "online"
    assert all(p["selected"] for p in status.values())


async def test_sampling_prefers_online_clients(app, client, alice, make_user) -> None:
    clients = [await make_user(f"p{i}", client=True) for i in range(6)]
    online = {clients[1].id, clients[4].id}
    async with app.state.sessionmaker() as session:
        for c in clients:
            if c.id in online:
                session.add(ClientHeartbeat(user_id=c.user.id, last_seen_at=utcnow()))
            elif c is clients[0]:
                session.add(ClientHeartbeat(user_id=c.user.id, last_seen_at=utcnow() - dt.timedelta(hours=2)))
        await session.commit()
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        options={"clients_per_round": 3, "prefer_online_clients": True},
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    chosen = {p["id"] for p in detail["participant_status"] if p["selected"]}
    # both online clients, then one never heard from; never the offline one while others remain
    assert online < chosen and len(chosen) == 3 and clients[0].id not in chosen


async def test_a_client_offline_too_long_is_dropped_from_its_round(app, client, alice, make_user) -> None:
    c1, c2, c3 = [await make_user(f"o{i}", client=True) for i in range(3)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client, alice.headers, model_id, [c1.id, c2.id, c3.id], options={"skip_model_tests": True}
    )
    for c in (c1, c2):
        assert (
            await client.post(f"/api/trainings/{training_id}/heartbeat/", headers=c.headers)
        ).status_code == 200
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    state = state_of(initial)
    s1, s3 = shifted(state, 1.0), shifted(state, -1.0)
    assert (await post_update(client, c1.headers, model_id, as_safetensors(s1), 0, 10)).status_code == 201
    assert (await post_update(client, c3.headers, model_id, as_safetensors(s3), 0, 30)).status_code == 201
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert detail["round"] == 0 and detail["local_models_expected"] == 3  # waits for c2
    # c2 goes quiet past FLP_CLIENT_DROP_AFTER_SECONDS (c3, never heard from, is never dropped)
    async with app.state.sessionmaker() as session:
        await session.execute(
            update(ClientHeartbeat)
            .where(ClientHeartbeat.user_id == c2.user.id)
            .values(last_seen_at=utcnow() - dt.timedelta(seconds=121))
        )
        await session.commit()
    detail = await wait_training(client, alice.headers, training_id, lambda b: (b["round"] or 0) >= 1)
    assert c2.id in detail["participants"]  # still a participant, selected again in round 1
    expected = fedavg([s1, s3], [10, 30])
    got = state_of(
        (await client.get(f"/api/models/{model_id}/", params={"round": 1}, headers=alice.headers)).content
    )
    assert torch.allclose(got["fc1.weight"].double(), expected["fc1.weight"].double(), atol=1e-5)
    rounds = (await client.get(f"/api/trainings/{training_id}/rounds/", headers=alice.headers)).json()
    first = next(x for x in rounds if x["round"] == 0)
    assert set(first["answered"]) == {c1.id, c3.id}
    assert [d["participant"] for d in first["dropped"]] == [c2.id]
    async with app.state.sessionmaker() as session:
        kinds = (
            await session.execute(
                select(TrainingEvent.kind, TrainingEvent.data).where(
                    TrainingEvent.training_id == uuid.UUID(training_id)
                )
            )
        ).all()
    dropped = [(d["participant_id"], d["round"]) for k, d in kinds if k == "participant_dropped"]
    assert dropped[0] == (c2.id, 0)  # and again from round 1 while it stays quiet
    assert {who for who, _ in dropped} == {c2.id}


async def test_concurrent_uploads_aggregate_the_selected_set_once(app, client, alice, make_user) -> None:
    """Every participant uploads at once (the selected and the others): each round is aggregated
    exactly once, over exactly the selected clients."""
    clients = [await make_user(f"x{i}", client=True) for i in range(6)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        options={"clients_per_round": 0.5, "skip_model_tests": True},
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    state = state_of(initial)
    for round_ in range(2):
        detail = await wait_training(client, alice.headers, training_id, _at(round_))
        asked = {p["id"] for p in detail["participant_status"] if p["selected"]}
        results = await asyncio.gather(
            *(
                post_update(
                    client, c.headers, model_id, as_safetensors(shifted(state, 0.1 * i)), round_, 5 + i
                )
                for i, c in enumerate(clients)
            )
        )
        for c, r in zip(clients, results, strict=True):
            if c.id in asked:  # the round waits for these: never refused
                assert r.status_code == 201, r.text
            else:  # stored while the round is open; refused once the asked clients closed it
                assert r.status_code == 201 or r.json()["code"] in ("wrong_round", "round_locked"), r.text
        await wait_training(client, alice.headers, training_id, lambda b, r=round_: (b["round"] or 0) > r)
    await wait_training(client, alice.headers, training_id, lambda b: b["state"] == "C")
    rounds = {
        x["round"]: x
        for x in (await client.get(f"/api/trainings/{training_id}/rounds/", headers=alice.headers)).json()
    }
    async with app.state.sessionmaker() as session:
        finished = [
            d
            for k, d in (
                await session.execute(
                    select(TrainingEvent.kind, TrainingEvent.data).where(
                        TrainingEvent.training_id == uuid.UUID(training_id)
                    )
                )
            ).all()
            if k == "aggregation_finished"
        ]
    assert sorted(d["round"] for d in finished) == [0, 1]  # once per round
    for d in finished:
        assert d["updates"] == 3 == len(rounds[d["round"]]["selected"])


async def test_late_joiners_wait_for_the_next_draw(app, client, alice, make_user) -> None:
    clients = [await make_user(f"l{i}", client=True) for i in range(3)]
    late = await make_user("l-late", client=True)
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(
        client, alice.headers, model_id, [c.id for c in clients], options={"clients_per_round": 2}
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    r = await client.put(
        f"/api/trainings/{training_id}/clients/", headers=alice.headers, json={"clients": [late.id]}
    )
    assert r.status_code == 202, r.text
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert late.id in detail["participants"] and detail["local_models_expected"] == 2
    assert not next(p for p in detail["participant_status"] if p["id"] == late.id)["selected"]
    assert late.id in set().union(*(await _notified(app, training_id, "TRAINING_START")).values())
    assert late.id not in (await _notified(app, training_id, "UPDATE_ROUND_START"))[0]
    beat = (await client.post(f"/api/trainings/{training_id}/heartbeat/", headers=late.headers)).json()
    assert beat["selected"] is False and beat["phase"] == "update"
    # the same through the SDK
    async with FLPlatformAPI(
        "http://testserver", token=late.token, transport=httpx.ASGITransport(app=app)
    ) as api:
        beat = await api.heartbeat(training_id)
        assert beat["selected"] is False and beat["round"] == 0
        (round_0,) = await api.training_rounds(training_id)
        assert round_0["round"] == 0 and late.id not in round_0["selected"] and len(round_0["selected"]) == 2


async def test_asynchronous_training_with_sampling(app, client, alice, make_user) -> None:
    """FedBuff with clients_per_round: each version asks a new draw; an update from a client the
    current draw did not ask (asked for an older version, or not at all) still fills the buffer."""
    clients = [await make_user(f"a{i}", client=True) for i in range(4)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        target_num_updates=2,
        options={"mode": "async", "fedbuff": {"buffer_size": 2}, "clients_per_round": 2, "seed": 5},
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    asked = _expected_draw(5, 0, clients, 2)
    assert (await _notified(app, training_id, "UPDATE_ROUND_START"))[0] == asked
    x0 = state_of(initial)
    inside = next(c for c in clients if c.id in asked)
    outside = next(c for c in clients if c.id not in asked)
    for n, c in enumerate((inside, outside)):
        r = await post_update(client, c.headers, model_id, as_safetensors(shifted(x0, 1.0 + n)), 0, 10)
        assert r.status_code == 201, r.text
    detail = await wait_training(client, alice.headers, training_id, _at(1))
    assert {p["id"] for p in detail["participant_status"] if p["selected"]} == _expected_draw(
        5, 1, clients, 2
    )
    assert (await _notified(app, training_id, "UPDATE_ROUND_START"))[1] == _expected_draw(5, 1, clients, 2)


async def test_a_broker_backends_pong_makes_its_owner_online(app, client, alice, make_user) -> None:
    """Broker-based clients need no HTTP heartbeat: the broker's status-ping pong on a topic the
    participant owns is one."""
    backend = await make_user("b-backend", client=True)
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(client, alice.headers, model_id, [backend.id])
    slug = f"t_{uuid.uuid4().hex[:10]}"
    async with app.state.sessionmaker() as session:
        session.add(
            BrokerTopic(
                slug=slug, owner_id=backend.user.id, is_public=True, anonymous_can_consume=True, api_info={}
            )
        )
        await session.commit()

    async def liveness() -> str:
        detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
        return str(detail["participant_status"][0]["liveness"])

    assert await liveness() == "unknown"
    async with serve_live(app) as live, live.connect("status-ping") as pong:
        frame = {"properties": {"requestContext": "1", "messageType": "pong", "source_topic": slug}}
        await pong.send(json.dumps({**frame, "context": "1", "payload": ""}))
        assert (await recv_json(pong))["result"] == "ok"
        await live.broker.flush()
    assert await liveness() == "online"


async def test_a_sampled_round_whose_asked_clients_all_went_offline_asks_others(
    app, client, alice, make_user
) -> None:
    clients = [await make_user(f"r{i}", client=True) for i in range(4)]
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        options={"clients_per_round": 2, "seed": 11, "skip_model_tests": True},
    )
    asked = _expected_draw(11, 0, clients, 2)
    async with app.state.sessionmaker() as session:  # the two the draw picks were heard from long ago
        for c in clients:
            if c.id in asked:
                session.add(ClientHeartbeat(user_id=c.user.id, last_seen_at=utcnow() - dt.timedelta(hours=1)))
        await session.commit()
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    others = {c.id for c in clients} - asked
    detail = await wait_training(
        client,
        alice.headers,
        training_id,
        lambda b: {p["id"] for p in b["participant_status"] if p["selected"]} == others,
    )
    assert detail["state"] == "O" and detail["round"] == 0 and detail["local_models_expected"] == 2
    assert (
        others <= (await _notified(app, training_id, "UPDATE_ROUND_START"))[0]
    )  # (pending ones of the dropped are deleted)
    (round_0,) = (await client.get(f"/api/trainings/{training_id}/rounds/", headers=alice.headers)).json()
    assert set(round_0["selected"]) == asked | others
    assert {d["participant"] for d in round_0["dropped"]} == asked
