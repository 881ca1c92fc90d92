"""Asynchronous rounds (``options.mode = "async"``, FedBuff) through the API: the first K updates
make a new global version, staleness-weighted against their own base version; uploads name the
version they trained from in the wire contract's ``round`` field; a slow client holds up a
synchronous FedAvg training but not an asynchronous one; every update is folded exactly once
across concurrent uploads and several engines (PostgreSQL)."""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import select

from flplatform.blobs import FileBlobStore, store_for
from flplatform.client import FLPlatformAPI, Participant
from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm import GlobalModelRound, LocalModel, TrainingEvent
from flplatform.orm.workqueue import QueuedWork
from flplatform.trainings.runtime import AGGREGATE_JOB, AggregationJob, TrainingRuntime
from tests.page_cache import page_cache_can_be_dropped, resident_pages
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

ASYNC = {"mode": "async", "fedbuff": {"buffer_size": 2}}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    for key, value in want.items():
        if value.is_floating_point():
            assert torch.allclose(got[key].double(), value.double(), atol=atol), key
        else:
            assert got[key].item() == value.item(), key


def _fedbuff_step(
    current: dict[str, torch.Tensor],
    updates: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]],
    server_lr: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Independent FedBuff for the assertions: updates are (weights, base, staleness, samples)."""
    total = sum(n for *_, n in updates)
    out = {}
    for key, ref in current.items():
        step = sum((1 / math.sqrt(1 + s)) * n * (w[key].double() - b[key].double()) for w, b, s, n in updates)
        value = ref.double() + server_lr * step / total
        out[key] = value.to(ref.dtype) if ref.is_floating_point() else torch.round(value).to(ref.dtype)
    return out


async def _model(client: httpx.AsyncClient, headers: dict[str, str], model_id: str, version: int) -> Any:
    r = await client.get(f"/api/models/{model_id}/", params={"round": version}, headers=headers)
    assert r.status_code == 200, r.text
    return state_of(r.content)


async def test_first_k_updates_make_a_version_staleness_weighted(client, alice, make_user, session):
    c1, c2, c3 = [await make_user(f"c{i}", client=True) for i in (1, 2, 3)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client, alice.headers, model_id, [c1.id, c2.id, c3.id], options=ASYNC, target_num_updates=2
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    x0 = state_of(initial)
    s1, s2, s3 = shifted(x0, 1.0), shifted(x0, -0.5), shifted(x0, 2.0)

    # c1 and c2 train from version 0: the buffer (K = 2) is full, version 1 without c3.
    assert (await post_update(client, c1.headers, model_id, as_safetensors(s1), 0, 30)).status_code == 201
    r = await post_update(client, c2.headers, model_id, scripted_with(initial, s2), 0, 10)
    assert r.status_code == 201, r.text
    body = await wait_training(client, alice.headers, training_id, lambda b: b["round"] == 1)
    assert body["state"] == "O" and body["phase"] == "update"
    x1 = await _model(client, c1.headers, model_id, 1)
    _close(x1, fedavg([s1, s2], [30, 10]))

    # c3 was still on version 0: its update is one version stale and waits in the buffer.
    r = await post_update(client, c3.headers, model_id, as_safetensors(s3), 0, 20)
    assert r.status_code == 201, r.text
    assert r.json()["round"] == 0
    # The wire contract's refusals: a version that does not exist yet, an update already folded.
    r = await post_update(client, c1.headers, model_id, as_safetensors(s1), 2, 30)
    assert r.status_code == 400 and r.json()["code"] == "wrong_round"
    r = await post_update(client, c1.headers, model_id, as_safetensors(s1), 0, 30)
    assert r.status_code == 409 and r.json()["code"] == "already_folded"
    assert (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()["round"] == 1

    s4 = shifted(x1, 0.25)
    assert (await post_update(client, c1.headers, model_id, as_safetensors(s4), 1, 10)).status_code == 201
    final = await wait_training(client, alice.headers, training_id, lambda b: b["state"] == "C")
    assert final["round"] == 2
    x2 = await _model(client, alice.headers, model_id, 2)
    _close(x2, _fedbuff_step(x1, [(s3, x0, 1, 20), (s4, x1, 0, 10)]), atol=1e-4)

    rows = (
        await session.execute(
            select(LocalModel.owner_id, LocalModel.round, LocalModel.folded_into).where(
                LocalModel.base_model_id == uuid.UUID(model_id)
            )
        )
    ).all()
    folded = {(str(owner), base): into for owner, base, into in rows}
    assert folded == {(c1.id, 0): 1, (c2.id, 0): 1, (c3.id, 0): 2, (c1.id, 1): 2}
    events = (
        await session.execute(
            select(TrainingEvent.kind, TrainingEvent.data)
            .where(TrainingEvent.training_id == uuid.UUID(training_id))
            .order_by(TrainingEvent.seq)
        )
    ).all()
    finished = [data for kind, data in events if kind == "aggregation_finished"]
    assert [(d["method"], d["updates"], d["new_round"]) for d in finished] == [
        ("fedbuff", 2, 1),
        ("fedbuff", 2, 2),
    ]
    received = [data for kind, data in events if kind == "update_received"]
    assert [(d["round"], d["staleness"]) for d in received] == [(0, 0), (0, 0), (0, 1), (1, 0)]
    # folded updates are read no more: their pages leave the page cache, their bytes stay stored
    store = store_for(session)
    digests = (
        await session.execute(
            select(LocalModel.weights_digest).where(LocalModel.base_model_id == uuid.UUID(model_id))
        )
    ).scalars()
    paths = [store.path(d) for d in digests if d is not None] if isinstance(store, FileBlobStore) else []
    if paths and page_cache_can_be_dropped(store.spool):
        for _ in range(200):
            if all(resident_pages(path) == 0 for path in paths):
                break
            await asyncio.sleep(0.05)
        assert [resident_pages(path) for path in paths] == [0] * 4


def scripted_with(initial: bytes, state: dict[str, torch.Tensor]) -> bytes:
    """A TorchScript upload (the DLR clients' format) carrying ``state``."""
    import io

    module = torch.jit.load(io.BytesIO(initial))
    module.load_state_dict(state)
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


async def test_options_are_checked(client, alice, make_user):
    c1 = await make_user("c1", client=True)
    model_id = await upload_global(client, alice.headers)
    base = {"model_id": model_id, "target_num_updates": 2, "aggregation_method": "FedAvg", "clients": [c1.id]}
    for body in (
        {"options": {"fedbuff": {"buffer_size": 2}}},  # fedbuff without mode async
        {"options": {"mode": "async", "aggregator": "median"}},
        {"options": {"mode": "async", "dp": {"clip_norm": 1.0}}},
        {"options": {"mode": "async", "daisy_chain_period": 2}, "aggregation_method": "FedDC"},
        {"options": {"mode": "async", "fedbuff": {"buffer_size": 0}}},
        {"options": {"mode": "async", "fedbuff": {"staleness": "exponential"}}},
        {"options": {"mode": "later"}},
    ):
        r = await client.post("/api/trainings/", headers=alice.headers, json={**base, **body})
        assert r.status_code == 422, (body, r.text)
    r = await client.post(
        "/api/trainings/", headers=alice.headers, json={**base, "options": {"mode": "async"}}
    )
    assert r.status_code == 201, r.text
    detail = (await client.get(f"/api/trainings/{r.json()['training_id']}/", headers=alice.headers)).json()
    assert detail["options"]["mode"] == "async"
    assert detail["options"]["fedbuff"]["buffer_size"] == 2
    assert detail["options"]["fedbuff"]["staleness"] == "polynomial"


async def test_max_staleness_refuses_old_updates(client, alice, make_user):
    c1, c2, c3 = [await make_user(f"c{i}", client=True) for i in (1, 2, 3)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    options = {"mode": "async", "fedbuff": {"buffer_size": 2, "max_staleness": 0}}
    training_id = await create_training(
        client, alice.headers, model_id, [c1.id, c2.id, c3.id], options=options, target_num_updates=3
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    x0 = state_of(initial)
    for c in (c1, c2):
        assert (await post_update(client, c.headers, model_id, as_safetensors(x0), 0, 5)).status_code == 201
    await wait_training(client, alice.headers, training_id, lambda b: b["round"] == 1)
    r = await post_update(client, c3.headers, model_id, as_safetensors(x0), 0, 5)
    assert r.status_code == 400 and r.json()["code"] == "too_stale", r.text
    assert (await post_update(client, c3.headers, model_id, as_safetensors(x0), 1, 5)).status_code == 201


# --------------------------------------------------------------------------- slow client


async def _participants(app: Any, tokens: list[str], release: threading.Event) -> list[Participant]:
    """Two fast polling participants and a slow one that trains until ``release`` is set."""

    def fast(module: torch.nn.Module, round_: int, ctx: Any) -> tuple[int, dict[str, float]]:
        with torch.no_grad():
            for param in module.parameters():
                param.add_(0.01)
        return 10, {}

    def slow(module: torch.nn.Module, round_: int, ctx: Any) -> tuple[int, dict[str, float]]:
        release.wait(timeout=60)
        return fast(module, round_, ctx)

    participants = []
    for i, token in enumerate(tokens):
        api = FLPlatformAPI("http://testserver", token=token, transport=httpx.ASGITransport(app=app))
        participants.append(Participant(api, slow if i == 2 else fast, name=f"p{i}"))
    return participants


async def _close_all(participants: list[Participant], tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for p in participants:
        await p.aclose()
        await p.api.aclose()


async def test_async_reaches_its_target_without_the_slow_client_sync_waits(app, client, alice, make_user):
    users = [await make_user(f"p{i}", client=True) for i in range(3)]
    ids, tokens = [u.id for u in users], [u.token for u in users]

    # Asynchronous: three new versions from the two fast clients while the slow one still trains.
    release = threading.Event()
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(
        client, alice.headers, model_id, ids, options=ASYNC, target_num_updates=3
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    participants = await _participants(app, tokens, release)
    tasks = [asyncio.create_task(p.poll(training_id, interval=0.05)) for p in participants]
    try:
        final = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in "CE", 60)
        assert final["state"] == "C" and final["round"] == 3, final
        assert not release.is_set()  # the slow client never uploaded
        models = (await client.get(f"/api/trainings/{training_id}/models/", headers=alice.headers)).json()
        owners = {m["owner"] for m in models if m["type"] == "LOCAL"}
        assert owners == {ids[0], ids[1]}
    finally:
        release.set()
        await _close_all(participants, tasks)

    # Synchronous FedAvg, same clients: the round waits for the slow client.
    release = threading.Event()
    model_id = await upload_global(client, alice.headers)
    training_id = await create_training(
        client, alice.headers, model_id, ids, options={"skip_model_tests": True}, target_num_updates=1
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    participants = await _participants(app, tokens, release)
    tasks = [asyncio.create_task(p.poll(training_id, interval=0.05)) for p in participants]
    try:
        await wait_training(client, alice.headers, training_id, lambda b: b["local_models_arrived"] == 2, 60)
        await asyncio.sleep(1.0)
        body = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
        assert body["state"] == "O" and body["round"] == 0 and body["local_models_arrived"] == 2
        release.set()
        final = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in "CE", 60)
        assert final["state"] == "C" and final["round"] == 1, final
    finally:
        release.set()
        await _close_all(participants, tasks)


# --------------------------------------------------------------------------- exactly once


@pytest.mark.postgres_only
async def test_every_update_is_folded_exactly_once_across_engines(
    app, client, alice, make_user, db_url, settings
):
    clients = [await make_user(f"c{i}", client=True) for i in range(6)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client, alice.headers, model_id, [c.id for c in clients], options=ASYNC, target_num_updates=3
    )
    await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    x0 = state_of(initial)
    # A second engine on its own connection pool, as another server process would be.
    engine = create_engine(db_url)
    other = TrainingRuntime(sessionmaker=create_sessionmaker(engine), settings=settings)
    tid = uuid.UUID(training_id)
    stop = asyncio.Event()

    async def hammer() -> None:
        while not stop.is_set():
            await other.advance(tid)
            await asyncio.sleep(0)

    hammering = asyncio.create_task(hammer())
    try:
        answers = await asyncio.gather(
            *(
                post_update(client, c.headers, model_id, as_safetensors(shifted(x0, 0.1 * i)), 0, 5 + i)
                for i, c in enumerate(clients)
            )
        )
        assert [r.status_code for r in answers] == [201] * 6, [r.text for r in answers]
        await wait_training(client, alice.headers, training_id, lambda b: b["state"] in "CE", 60)
    finally:
        stop.set()
        await hammering
    async with create_sessionmaker(engine)() as db:
        rows = (
            await db.execute(
                select(LocalModel.owner_id, LocalModel.sample_size, LocalModel.folded_into).where(
                    LocalModel.base_model_id == uuid.UUID(model_id)
                )
            )
        ).all()
        history = {
            r: d
            for r, d in (
                await db.execute(
                    select(GlobalModelRound.round, GlobalModelRound.id).where(
                        GlobalModelRound.model_id == uuid.UUID(model_id)
                    )
                )
            ).all()
        }
        jobs = (
            (await db.execute(select(QueuedWork.payload).where(QueuedWork.handler == AGGREGATE_JOB)))
            .scalars()
            .all()
        )
    by_version: dict[int, list[tuple[str, int]]] = {}
    for owner, size, into in rows:
        by_version.setdefault(into, []).append((str(owner), size))
    assert sorted(by_version) == [1, 2, 3] and all(len(v) == 2 for v in by_version.values()), by_version
    assert sorted(history) == [0, 1, 2, 3]
    # Each version is FedBuff over exactly its two updates, each 0..2 versions stale against version 0.
    shift = {c.id: 0.1 * i for i, c in enumerate(clients)}
    current = x0
    for version in (1, 2, 3):
        step = [(shifted(x0, shift[owner]), x0, version - 1, size) for owner, size in by_version[version]]
        current = _fedbuff_step(current, step)
        _close(await _model(client, alice.headers, model_id, version), current, atol=1e-4)
    # A job that runs again (its worker died after committing) finds its claim gone: nothing changes.
    assert len(jobs) == 3
    for payload in jobs:
        again_id, job = AggregationJob.from_payload(payload)
        assert job.kind == "buffer"
        assert await other.aggregate(again_id, job) is False
    body = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert body["state"] == "C" and body["round"] == 3
    await engine.dispose()
