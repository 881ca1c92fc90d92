"""Two worker processes on one PostgreSQL: updates uploaded through either are folded as they
arrive by exactly one process (it holds the round's advisory lock; the other only commits its rows
and wakes it through the training events), that process also closes the round (even when the last
update arrives through the other one), the lock goes with the round, and the round's model is
the FedAvg of exactly its updates."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import torch
from sqlalchemy import text

from flplatform.db import create_engine
from flplatform.trainings.folding import lock_key
from flplatform.trainings.runtime import AGGREGATE_JOB
from tests.scale.harness import (
    Fleet,
    SmallNet,
    admin_headers,
    as_safetensors,
    client_update,
    create_account,
    create_admin,
    fedavg,
    post_update,
    scripted,
    state_of,
    upload_model,
    wait_for,
)

pytestmark = [pytest.mark.postgres_only, pytest.mark.slow]


async def _lock_holders(db_url: str, key: int) -> list[int]:
    """Backend pids holding the advisory lock ``key`` (a bigint key: classid, objid = its halves)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    engine = create_engine(db_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = :hi AND objid = :lo AND objsubid = 1"
                ),
                {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
            )
            return [pid for (pid,) in rows]
    finally:
        await engine.dispose()


async def _close_reports(db_url: str, training_id: str) -> list[dict[str, object]]:
    """The results of the training's finished aggregation jobs."""
    engine = create_engine(db_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT q.result FROM queued_works q JOIN works w ON w.id = q.id "
                    "WHERE q.handler = :kind AND w.status = 'finished'"
                ),
                {"kind": AGGREGATE_JOB},
            )
            return [r for (r,) in rows if r and r.get("training_id") == training_id]
    finally:
        await engine.dispose()


async def _until_holders(db_url: str, key: int, count: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        holders = await _lock_holders(db_url, key)
        if len(holders) == count or time.monotonic() > deadline:
            return holders
        await asyncio.sleep(0.1)


def test_one_process_folds_a_round_whichever_worker_takes_the_uploads(db_url: str, workers: Fleet) -> None:
    create_admin(db_url)
    asyncio.run(_round(db_url, workers.ensure(2)))


async def _round(db_url: str, urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=60.0) as http:
        admin = await admin_headers(http, urls[0])
        actor = await create_account(http, urls[0], admin, "fold-actor", actor=True)
        accounts = [await create_account(http, urls[0], admin, f"fold-{i}", client=True) for i in range(3)]
        torch.manual_seed(11)
        initial = scripted(SmallNet())
        model_id = await upload_model(http, urls[0], actor.headers, initial)
        body = {
            "model_id": model_id,
            "target_num_updates": 1,
            "aggregation_method": "FedAvg",
            "clients": [a.id for a in accounts],
            "options": {"skip_model_tests": True},
        }
        r = await http.post(f"{urls[0]}/api/trainings/", headers=actor.headers, json=body)
        assert r.status_code == 201, r.text
        training_id = r.json()["training_id"]
        r = await http.post(f"{urls[1]}/api/trainings/{training_id}/start/", headers=actor.headers)
        assert r.status_code == 202, r.text
        await wait_for(
            http,
            urls[0],
            actor.headers,
            training_id,
            lambda s: s["round"] == 0 and s["phase"] == "update" and not s["locked"],
            what="round 0 open",
        )
        key = lock_key(uuid.UUID(model_id), 0)
        start = state_of(initial)
        updates = [client_update(start, i, 0) for i in range(3)]
        sizes = [7, 11, 13]
        for i in (0, 1):  # one upload through each worker
            r = await post_update(
                http, urls[i], accounts[i].headers, model_id, as_safetensors(updates[i]), 0, sizes[i]
            )
            assert r.status_code == 201, r.text
        holders = await _until_holders(db_url, key, 1)
        assert len(holders) == 1, holders  # one folding process for the round, not one per worker
        await asyncio.sleep(0.5)
        assert await _lock_holders(db_url, key) == holders  # the other worker did not take it over
        r = await post_update(
            http, urls[1], accounts[2].headers, model_id, as_safetensors(updates[2]), 0, sizes[2]
        )
        assert r.status_code == 201, r.text
        final = await wait_for(
            http, urls[0], actor.headers, training_id, lambda s: s["state"] == "C", what="training completed"
        )
        assert final["round"] == 1
        r = await http.get(f"{urls[1]}/api/models/{model_id}/", headers=actor.headers, params={"round": 1})
        got = state_of(r.content)
        expected = fedavg(updates, sizes)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
        assert await _until_holders(db_url, key, 0) == []  # released with the round
        # The round was closed by the folding process (url 0's, which took the first upload), not by the
        # one that took the last upload: its folder was used, nothing was folded again from the store.
        reports = await _close_reports(db_url, training_id)
        assert len(reports) == 1 and reports[0]["committed"] is True, reports
        assert reports[0]["folded_on_arrival"] is not None and reports[0]["folded_on_arrival"] >= 2, reports
