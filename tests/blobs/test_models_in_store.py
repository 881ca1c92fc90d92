"""Model bytes live in the blob store, rows keep digests, and the history's retention setting
(FLP_GLOBAL_HISTORY_KEEP_ROUNDS) keeps the last K rounds; on both databases."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from flplatform.blobs import open_store
from flplatform.orm import GlobalModelRound, LocalModel, Model, Training
from flplatform.settings import Settings
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


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, training_sweep_interval_seconds=0.05, global_history_keep_rounds=1)


async def _wait(client: Any, headers: Any, training_id: str, cond: Any) -> dict[str, Any]:
    for _ in range(300):
        body = (await client.get(f"/api/trainings/{training_id}/", headers=headers)).json()
        if cond(body):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(body)


async def test_rounds_go_through_the_store_and_old_history_is_dropped(app, client, alice, make_user):
    store = open_store(app.state.settings)
    c1 = await make_user("c1", client=True)
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    mid = uuid.UUID(model_id)
    async with app.state.sessionmaker() as session:
        row = (await session.execute(select(Model).where(Model.id == mid))).scalar_one()
        assert (row.weights_digest, row.weights_size) == (hashlib.sha256(initial).hexdigest(), len(initial))
    assert await store.read(row.weights_digest) == initial

    training_id = await create_training(client, alice.headers, model_id, [c1.id], metric_names=[])
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    state = state_of(initial)
    update = as_safetensors(shifted(state, 1.0))
    assert (await post_update(client, c1.headers, model_id, update, 0)).status_code == 201
    async with app.state.sessionmaker() as session:
        local = (await session.execute(select(LocalModel))).scalar_one()
        assert local.weights_format == "safetensors" and await store.exists(local.weights_digest)
    await _wait(client, alice.headers, training_id, lambda b: b["round"] == 1)

    # Round 1 is the last one kept: round 0 (the upload) is gone from the history.
    assert (
        await client.get(f"/api/models/{model_id}/", params={"round": 0}, headers=alice.headers)
    ).status_code == 404
    r = await client.get(f"/api/models/{model_id}/", params={"round": 1}, headers=alice.headers)
    assert (
        r.status_code == 200
        and r.content == (await client.get(f"/api/models/{model_id}/", headers=alice.headers)).content
    )
    async with app.state.sessionmaker() as session:
        rounds = (
            (await session.execute(select(GlobalModelRound.round).where(GlobalModelRound.model_id == mid)))
            .scalars()
            .all()
        )
        assert rounds == [1]
        state_digest = (await session.execute(select(Training.aggregator_state_digest))).scalar_one()
        assert state_digest is not None and await store.exists(state_digest)
    info = (await client.get(f"/api/models/{model_id}/info/", headers=alice.headers)).json()
    assert info["rounds"] == [1]


async def test_downloads_stream_with_etag_304_and_ranges(client, alice):
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    digest = hashlib.sha256(initial).hexdigest()
    url = f"/api/models/{model_id}/"
    r = await client.get(url, headers=alice.headers)
    assert r.status_code == 200 and r.content == initial
    assert (
        r.headers["etag"] == f'"{digest}"'
        and r.headers["content-disposition"] == f'filename="model-{model_id}.pt"'
    )
    r = await client.get(url, headers={**alice.headers, "If-None-Match": f'"{digest}"'})
    assert r.status_code == 304 and r.content == b""
    r = await client.get(url, params={"round": 0}, headers={**alice.headers, "Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == initial[:10]
    assert r.headers["content-range"] == f"bytes 0-9/{len(initial)}"
    r = await client.get(url, headers={**alice.headers, "Range": f"bytes={len(initial)}-"})
    assert r.status_code == 416 and r.json()["code"] == "range_not_satisfiable"
    # Nobody else learns anything from the validators: 404 before any header.
    assert (
        await client.get(f"/api/models/{uuid.uuid4()}/", headers={"If-None-Match": "*", **alice.headers})
    ).status_code == 404
