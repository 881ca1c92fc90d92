"""Live training events (``GET /api/trainings/{id}/events/``, Server-Sent Events) over real HTTP,
read with the SDK's ``watch``: in order through a training's rounds, replayed from
``Last-Event-ID``, nothing for a rolled-back change, pruned to a bounded history, and 404 for
another organisation. (The two-process case is in ``tests/scale/test_events_multiworker.py``.)"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from flplatform.client import APIError, FLPlatformAPI, TrainingEvent
from flplatform.client.events import SSEMessage, parse_sse
from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm import GlobalModel, Training
from flplatform.orm import TrainingEvent as TrainingEventRow
from flplatform.settings import Settings
from flplatform.trainings import events as training_events
from tests.permissions.conftest import build_org_tree
from tests.training.conftest import as_safetensors, scripted_bytes, shifted, state_of, tiny_net
from tests.training.live import live_server, make_users

pytestmark = pytest.mark.slow


def _settings(db_url: str, **fields: Any) -> Settings:
    fields.setdefault("training_events_poll_seconds", 30.0)  # a missed wake-up shows as a timeout
    return Settings(database_url=db_url, training_sweep_interval_seconds=0.05, **fields)


async def _collect(api: FLPlatformAPI, training_id: str, **kw: Any) -> list[TrainingEvent]:
    return [e async for e in api.watch(training_id, until_finished=True, **kw)]


async def _run_training(base: str, db_url: str, rounds: int = 2) -> tuple[str, str, list[tuple[str, str]]]:
    """Actor + 2 clients; a training of ``rounds`` rounds with test rounds, driven over HTTP to
    its end. Returns (training id, actor token, [(client id, token)])."""
    (_, actor), *clients = await asyncio.to_thread(
        make_users,
        db_url,
        [
            {"username": "actor", "actor": True},
            {"username": "c1", "client": True},
            {"username": "c2", "client": True},
        ],
    )
    auth = {"Authorization": f"Token {actor}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        initial = scripted_bytes(tiny_net())
        r = await http.post(
            "/api/models/",
            headers=auth,
            data={"name": "tiny", "description": "", "type": "GLOBAL"},
            files={"model_file": ("m.pt", initial)},
        )
        assert r.status_code == 201, r.text
        model_id = r.json()["model_id"]
        body = {
            "model_id": model_id,
            "target_num_updates": rounds,
            "metric_names": ["accuracy"],
            "aggregation_method": "FedAvg",
            "clients": [cid for cid, _ in clients],
        }
        r = await http.post("/api/trainings/", headers=auth, json=body)
        assert r.status_code == 201, r.text
        training_id = r.json()["training_id"]
        return training_id, actor, clients


async def _drive(
    base: str, actor: str, clients: list[tuple[str, str]], training_id: str, rounds: int
) -> None:
    auth = {"Authorization": f"Token {actor}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        detail = (await http.get(f"/api/trainings/{training_id}/", headers=auth)).json()
        model_id = detail["model"]
        r = await http.post(f"/api/trainings/{training_id}/start/", headers=auth)
        assert r.status_code == 202, r.text
        for round_ in range(rounds):
            state = state_of((await http.get(f"/api/models/{model_id}/", headers=auth)).content)
            for i, (_, token) in enumerate(clients):
                r = await http.post(
                    f"/api/models/{model_id}/",
                    headers={"Authorization": f"Token {token}"},
                    data={"round": str(round_), "sample_size": str(10 * (i + 1))},
                    files={"model_file": ("u.safetensors", as_safetensors(shifted(state, 0.1 * (i + 1))))},
                )
                assert r.status_code == 201, r.text
            await _wait(
                http, auth, training_id, lambda b, r=round_: b["phase"] == "test" and b["round"] == r + 1
            )
            for i, (_, token) in enumerate(clients):
                r = await http.post(
                    f"/api/models/{model_id}/metrics/",
                    headers={"Authorization": f"Token {token}"},
                    data={"metric_names": ["accuracy"], "metric_values": [str(0.5 + 0.1 * i)]},
                )
                assert r.status_code == 201, r.text
            await _wait(
                http,
                auth,
                training_id,
                lambda b, r=round_: b["state"] == "C" or (b["phase"] == "update" and b["round"] == r + 1),
            )


async def _wait(http: httpx.AsyncClient, auth: dict[str, str], training_id: str, cond: Any) -> None:
    for _ in range(600):
        body = (await http.get(f"/api/trainings/{training_id}/", headers=auth)).json()
        if cond(body):
            return
        assert body["state"] != "E", body
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached: {body}")


def _expected(rounds: int) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = [("state_changed", 0)]
    for r in range(rounds):
        out += [("round_started", r), ("update_received", r), ("update_received", r)]
        out += [("aggregation_started", r), ("aggregation_finished", r), ("test_round_started", r + 1)]
        out += [("test_metrics_received", r + 1), ("test_metrics_received", r + 1)]
    out.append(("state_changed", rounds))
    return out


async def test_events_arrive_in_order_and_resume_from_last_event_id(db_url):
    rounds = 2
    with live_server(_settings(db_url)) as base:
        training_id, actor, clients = await _run_training(base, db_url, rounds)
        async with FLPlatformAPI(base, token=actor) as api:
            watcher = asyncio.create_task(asyncio.wait_for(_collect(api, training_id), 60))
            await asyncio.sleep(0.3)  # subscribed before anything happens: everything arrives live
            await _drive(base, actor, clients, training_id, rounds)
            got = await watcher

            assert [(e.kind, e.data.get("round")) for e in got] == _expected(rounds)
            assert [e.seq for e in got] == list(range(1, len(got) + 1))
            assert {e.training_id for e in got} == {training_id}
            assert got[0].data["state"] == "O" and got[0].data["previous_state"] == "I"
            assert got[-1].data["state"] == "C" and got[-1].finished
            uploads = [e.data for e in got if e.kind == "update_received"]
            assert [(u["participant"], u["sample_size"]) for u in uploads] == [
                ("c1", 10),
                ("c2", 20),
            ] * rounds
            finished = [e.data for e in got if e.kind == "aggregation_finished"]
            assert [(f["new_round"], f["updates"], f["method"]) for f in finished] == [
                (1, 2, "fedavg"),
                (2, 2, "fedavg"),
            ]
            assert all(f["duration_seconds"] >= 0 for f in finished)
            metrics = [e.data["metrics"] for e in got if e.kind == "test_metrics_received"]
            assert metrics[:2] == [{"accuracy": 0.5}, {"accuracy": 0.6}]

            # A subscriber that saw up to event 5 gets exactly the rest, then the stream stays open.
            resumed = await asyncio.wait_for(_collect(api, training_id, last_event_id=5), 30)
            assert [e.seq for e in resumed] == [e.seq for e in got[5:]]
            assert [(e.kind, e.data) for e in resumed] == [(e.kind, e.data) for e in got[5:]]
            # With no Last-Event-ID, the whole kept history is replayed.
            again = await asyncio.wait_for(_collect(api, training_id), 30)
            assert [e.seq for e in again] == [e.seq for e in got]


async def test_raw_stream_format_and_last_event_id_header(db_url):
    with live_server(_settings(db_url)) as base:
        training_id, actor, clients = await _run_training(base, db_url, 1)
        await _drive(base, actor, clients, training_id, 1)
        headers = {"Authorization": f"Token {actor}", "Last-Event-ID": "9"}
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("GET", f"/api/trainings/{training_id}/events/", headers=headers) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            messages: list[SSEMessage] = []
            async for message in parse_sse(response.aiter_lines()):
                messages.append(message)
                if message.event == "state_changed":
                    break
        # 10 events in a one-round training: the state change to O is 1, the one to C is 10.
        assert [m.id for m in messages] == ["10"]
        event = TrainingEvent.from_message(messages[0])
        assert event.kind == "state_changed" and event.seq == 10 and event.data["state"] == "C"


async def test_rolled_back_change_publishes_nothing_and_history_is_bounded(db_url):
    """An event recorded in a transaction that rolls back is never seen; pruning keeps the newest
    ``keep`` events and a subscriber from before them gets a ``gap`` event first."""
    with live_server(_settings(db_url)) as base:
        training_id, actor, _ = await _run_training(base, db_url, 1)
        tid = uuid.UUID(training_id)
        engine = create_engine(db_url)
        maker = create_sessionmaker(engine)
        try:
            async with maker() as session:
                await training_events.record(session, tid, "error", {"reason": "rolled back"})
                await session.rollback()
            async with maker() as session:
                for i in range(12):
                    await training_events.record(session, tid, "error", {"reason": f"kept {i}"})
                await session.commit()
            async with maker() as session:
                assert await training_events.prune(session, 10) == 2
                await session.commit()
                rows = (await session.execute(TrainingEventRow.__table__.select())).all()
                assert len(rows) == 10
        finally:
            await engine.dispose()
        async with FLPlatformAPI(base, token=actor) as api:
            got: list[TrainingEvent] = []

            async def read() -> None:
                async for event in api.watch(training_id, last_event_id=0):
                    got.append(event)
                    if event.seq == 12:
                        return

            await asyncio.wait_for(read(), 30)
        assert got[0].kind == "gap" and got[0].seq is None
        assert got[0].data == {"missed_from": 1, "missed_to": 2}
        # The rolled-back event took no number: the committed ones are 1..12, kept 3..12.
        assert [e.seq for e in got[1:]] == list(range(3, 13))
        assert [e.data["reason"] for e in got[1:]] == [f"kept {i}" for i in range(2, 12)]


async def test_other_organisation_gets_404_like_reading_the_training(app, settings):
    """Same permission as ``GET /api/trainings/{id}/``: the organisation's coach reads the stream,
    another organisation's admin gets 404, an anonymous caller 401."""
    tree = await build_org_tree(app, "ev", projects=1, groups=1)
    coach, member = tree.project_coach.user, tree.member_one.user
    async with app.state.sessionmaker() as session:
        glob = GlobalModel(
            owner_id=coach.id,
            name="org-net",
            weights_digest="0" * 64,
            weights_format="torchscript",
            weights_size=1,
        )
        session.add(glob)
        await session.flush()
        training = Training(
            model_id=glob.id, actor_id=coach.id, target_num_updates=1, participants=[member], options={}
        )
        session.add(training)
        await session.flush()
        await training_events.record(session, training.id, "error", {"reason": "org event"})
        await session.commit()
    path = f"/api/trainings/{training.id}/events/"
    with live_server(_settings(settings.database_url)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            assert (await http.get(path)).status_code == 401
            for intruder in (tree.other_admin, tree.other.actors["project_coach"]):
                r = await http.get(path, headers=intruder.headers)
                assert r.status_code == 404, r.text
                assert (
                    r.json()["detail"]
                    == (await http.get(path[: -len("events/")], headers=intruder.headers)).json()["detail"]
                )
        for reader in (tree.project_coach, tree.member_one, tree.org_admin):
            async with FLPlatformAPI(base, token=reader.token) as api:
                first = await asyncio.wait_for(anext(api.watch(str(training.id))), 10)
                assert (first.kind, first.seq, first.data) == ("error", 1, {"reason": "org event"})
        async with FLPlatformAPI(base, token=tree.other_admin.token) as api:
            with pytest.raises(APIError) as raised:
                await anext(api.watch(str(training.id)))
            assert raised.value.status_code == 404


async def test_deleting_the_training_ends_its_stream(db_url):
    with live_server(_settings(db_url, training_events_poll_seconds=0.2)) as base:
        training_id, actor, _ = await _run_training(base, db_url, 1)
        async with FLPlatformAPI(base, token=actor, retries=0) as api:
            seen: list[TrainingEvent] = []

            async def read() -> None:
                async for event in api.watch(training_id):
                    seen.append(event)

            reader = asyncio.create_task(read())
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                r = await http.delete(
                    f"/api/trainings/{training_id}/", headers={"Authorization": f"Token {actor}"}
                )
                assert r.status_code == 200, r.text
            with pytest.raises(APIError) as raised:  # the stream ended; reconnecting finds no training
                await asyncio.wait_for(reader, 10)
            assert raised.value.status_code == 404 and seen == []


async def test_sse_parser_follows_the_format():
    async def lines(*items: str):  # type: ignore[no-untyped-def]
        for item in items:
            yield item

    raw = [
        ": ping",
        "id: 7",
        "event: round_started",
        'data: {"seq": 7,',
        'data:  "kind": "round_started"}',
        "",
    ]
    raw += ["retry: 1500", "", "data: x", "id: bad\x00id", ""]
    got = [m async for m in parse_sse(lines(*raw))]
    assert got[0] == SSEMessage(event="round_started", data='{"seq": 7,\n "kind": "round_started"}', id="7")
    assert got[1].retry == 1500 and got[1].data == ""
    assert got[2].data == "x" and got[2].id == "7"  # an id with NUL is ignored; the last one stays
    assert TrainingEvent.from_message(got[0]).seq == 7
