"""Training events across two real uvicorn worker processes on one PostgreSQL: a subscriber on
one process receives, in order, the events that requests on the other process (and the
aggregation jobs, run by either) commit, carried by LISTEN/NOTIFY, not by the poll."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from flplatform.client import FLPlatformAPI, TrainingEvent
from tests.scale.harness import (
    Fleet,
    SmallNet,
    admin_headers,
    as_safetensors,
    client_update,
    create_account,
    create_admin,
    fleet,
    post_update,
    scripted,
    server_env,
    state_of,
    upload_model,
)

pytestmark = [pytest.mark.postgres_only, pytest.mark.slow]

# The stream's fallback re-read: far longer than the test waits for any event, so an event that
# arrives reached the subscriber's process through NOTIFY.
POLL_SECONDS = 120
CLIENTS, ROUNDS = 3, 2


@pytest.fixture(scope="module")
def event_workers(migrated_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if "postgresql" not in migrated_urls:
        pytest.skip("PostgreSQL not available")
    env = server_env(
        migrated_urls["postgresql"],
        FLP_TRAINING_EVENTS_POLL_SECONDS=str(POLL_SECONDS),
        FLP_WORKER_POLL_INTERVAL_SECONDS="0.2",
    )
    with fleet(env, tmp_path_factory.mktemp("event-workers")) as running:
        running.start(2)
        yield running


def test_event_on_one_worker_reaches_a_subscriber_on_the_other(db_url: str, event_workers: Fleet) -> None:
    create_admin(db_url)
    asyncio.run(_run(event_workers.ensure(2)))


async def _run(urls: list[str]) -> None:
    a, b = urls
    async with httpx.AsyncClient(timeout=30) as http:
        admin = await admin_headers(http, a)
        actor = await create_account(http, a, admin, "ev-actor", actor=True)
        clients = [
            await create_account(http, a, admin, f"ev-client-{i}", client=True) for i in range(CLIENTS)
        ]
        torch.manual_seed(3)
        initial = scripted(SmallNet())
        model_id = await upload_model(http, a, actor.headers, initial)
        body = {
            "model_id": model_id,
            "target_num_updates": ROUNDS,
            "aggregation_method": "FedAvg",
            "clients": [c.id for c in clients],
            "options": {"skip_model_tests": True},
        }
        r = await http.post(f"{a}/api/trainings/", headers=actor.headers, json=body)
        assert r.status_code == 201, r.text
        training_id = r.json()["training_id"]

        received: list[tuple[float, TrainingEvent]] = []
        delays: list[float] = []  # from the event's recording (its transaction) to its arrival on B

        async def subscribe() -> None:  # on worker B
            async with FLPlatformAPI(b, token=actor.token) as api:
                async for event in api.watch(training_id, until_finished=True):
                    received.append((time.monotonic(), event))
                    delays.append(time.time() - dt.datetime.fromisoformat(str(event.at)).timestamp())

        r = await http.get(f"{b}/api/trainings/{training_id}/", headers=actor.headers)  # B's first request
        assert r.status_code == 200, r.text  # (a cold process answers its first request slowly)
        watcher = asyncio.create_task(asyncio.wait_for(subscribe(), 90))
        await asyncio.sleep(1.0)  # the subscription is open before the first event
        started = time.monotonic()
        r = await http.post(f"{a}/api/trainings/{training_id}/start/", headers=actor.headers)  # on worker A
        assert r.status_code == 202, r.text
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
        assert received, "the start on worker A never reached the subscriber on worker B"
        first_latency = received[0][0] - started
        assert received[0][1].kind == "state_changed" and received[0][1].data["state"] == "O"
        assert first_latency < 5, first_latency  # NOTIFY, not the 120 s poll

        state = state_of(initial)
        for round_ in range(ROUNDS):
            for i, c in enumerate(clients):
                update = as_safetensors(client_update(state, i, round_))
                r = await post_update(http, a, c.headers, model_id, update, round_, 10 + i)
                assert r.status_code == 201, r.text
            while not any(
                e.kind == "aggregation_finished" and e.data["round"] == round_ for _, e in received
            ):
                assert not watcher.done(), watcher
                await asyncio.sleep(0.05)
            r = await http.get(f"{a}/api/models/{model_id}/", headers=actor.headers)
            state = state_of(r.content)
        await watcher

    kinds = [(e.kind, e.data.get("round")) for _, e in received]
    expected: list[tuple[str, int | None]] = [("state_changed", 0)]
    for round_ in range(ROUNDS):
        expected += [("round_started", round_)] + [("update_received", round_)] * CLIENTS
        expected += [("aggregation_started", round_), ("aggregation_finished", round_)]
    expected.append(("state_changed", ROUNDS))
    assert kinds == expected
    assert [e.seq for _, e in received] == list(range(1, len(received) + 1))
    senders = [e.data["participant"] for _, e in received if e.kind == "update_received"]
    assert senders == [c.username for c in clients] * ROUNDS
    delays.sort()
    print(
        f"\nstart request on A -> first event on B: {first_latency * 1000:.0f} ms; recorded -> received on B "
        f"over {len(delays)} events: median {delays[len(delays) // 2] * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms"
    )
