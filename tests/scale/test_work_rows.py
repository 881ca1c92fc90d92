"""Aggregation and inference are ``Work`` rows (seed Work: category, status, timings, server), on
both databases, with the single-process in-process worker: a round's aggregation is a queued job
that the worker claims; a re-run of a finished job (at-least-once execution) changes nothing;
an inference is recorded as claimed and finished by the process that served it (in batches,
off the response path)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from sqlalchemy import func, select

from flplatform.orm import GlobalModelRound
from flplatform.orm.workqueue import QueuedWork, WorkKind, WorkStatus
from flplatform.trainings.jobs import run_aggregation_job
from flplatform.trainings.runtime import AGGREGATE_JOB
from flplatform.workqueue import JobContext
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


async def _worker_server_id(app: Any) -> uuid.UUID:
    worker = app.state.work_worker
    for _ in range(200):  # the in-process worker registers its Server row right after start-up
        if worker.server_id is not None:
            return worker.server_id
        await asyncio.sleep(0.025)
    raise AssertionError("the in-process worker never registered")


async def _jobs(app: Any, kind: WorkKind) -> list[QueuedWork]:
    async with app.state.sessionmaker() as session:
        stmt = select(QueuedWork).where(QueuedWork.kind == kind).order_by(QueuedWork.created_at)
        return list((await session.execute(stmt)).scalars())


async def _wait_state(
    client: httpx.AsyncClient, headers: dict[str, str], training_id: str, state: str
) -> dict[str, Any]:
    for _ in range(400):
        body = (await client.get(f"/api/trainings/{training_id}/", headers=headers)).json()
        if body["state"] == state:
            return body
        assert body["state"] != "E", body
        await asyncio.sleep(0.025)
    raise AssertionError(f"training never reached {state}: {body}")


async def test_rounds_aggregate_as_queued_jobs_and_a_rerun_changes_nothing(
    app, client, alice, make_user
) -> None:
    server_id = await _worker_server_id(app)
    clients = [await make_user(f"c{i}", client=True) for i in range(2)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        target_num_updates=2,
        options={"skip_model_tests": True},
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    state = state_of(initial)
    for round_ in range(2):
        for i, c in enumerate(clients):
            r = await post_update(
                client, c.headers, model_id, as_safetensors(shifted(state, 0.1 * (i + 1))), round_, 10
            )
            assert r.status_code == 201, r.text
        if round_ == 0:
            for _ in range(400):
                body = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
                if body["round"] == 1 and not body["locked"]:
                    break
                await asyncio.sleep(0.025)
    await _wait_state(client, alice.headers, training_id, "C")

    for _ in range(200):  # the worker records a job's outcome right after its handler returned
        jobs = await _jobs(app, WorkKind.AGGREGATION)
        if all(j.status == WorkStatus.FINISHED for j in jobs):
            break
        await asyncio.sleep(0.025)
    assert [(j.handler, j.payload["round"], j.status, j.attempts) for j in jobs] == [
        (AGGREGATE_JOB, 0, WorkStatus.FINISHED, 1),
        (AGGREGATE_JOB, 1, WorkStatus.FINISHED, 1),
    ]
    assert all(j.server_id == server_id and j.result["committed"] is True for j in jobs)
    assert all(j.model_id == uuid.UUID(model_id) and j.started_at and j.finished_at for j in jobs)

    # At-least-once execution: the same job run again (a worker died before recording the
    # outcome) finds its claim gone and leaves the round, the history and the ledger alone.
    ctx = JobContext(
        sessionmaker=app.state.sessionmaker,
        settings=app.state.settings,
        job_id=jobs[0].id,
        attempt=2,
        app=app,
    )
    again = await run_aggregation_job(ctx, jobs[0].payload)
    assert again["committed"] is False
    async with app.state.sessionmaker() as session:
        history = (
            await session.execute(
                select(func.count())
                .select_from(GlobalModelRound)
                .where(GlobalModelRound.model_id == uuid.UUID(model_id))
            )
        ).scalar_one()
    assert history == 3  # rounds 0, 1, 2
    body = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert body["state"] == "C" and body["round"] == 2


async def _hold_background_writes(work_log) -> None:
    """Stop the log's once-a-second background write for this test: on a loaded machine a request
    can take longer than that interval, and the row would be written before the test looks."""
    work_log.interval = 3600.0
    work_log._wake.set()  # the writer wakes, writes nothing, and waits again with the new interval
    await asyncio.sleep(0.1)


async def test_inference_is_work_claimed_and_finished_by_the_serving_process(app, client, alice) -> None:
    server_id = await _worker_server_id(app)
    await _hold_background_writes(app.state.work_log)
    model_id = await upload_global(client, alice.headers, scripted_bytes(tiny_net()))
    net = tiny_net()
    width = next(p for p in net.parameters()).shape[1]
    ok = await client.post(
        "/api/inference/",
        headers=alice.headers,
        json={"model_id": model_id, "model_input": [[0.5] * width] * 3},
    )
    assert ok.status_code == 200, ok.text
    refused = await client.post(
        "/api/inference/",
        headers=alice.headers,
        json={"model_id": model_id, "model_input": [[0.5] * (width + 1)] * 3},
    )
    assert 400 <= refused.status_code < 500, refused.text

    assert await _jobs(app, WorkKind.INFERENCE) == []  # written in batches, off the response path
    assert await app.state.work_log.flush() == 1
    [work] = await _jobs(app, WorkKind.INFERENCE)  # the refused request recorded nothing
    assert (work.handler, work.status, work.attempts, work.server_id) == (
        "inference.request",
        WorkStatus.FINISHED,
        1,
        server_id,
    )
    assert work.model_id == uuid.UUID(model_id) and work.result == {"method": "NONE", "rows": 3, "round": 0}
    assert work.started_at <= work.finished_at and work.lease_until is None
    assert await _jobs(app, WorkKind.AGGREGATION) == []  # nothing was queued for another process
