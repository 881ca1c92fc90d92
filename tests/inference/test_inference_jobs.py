"""Asynchronous inference jobs (POST /api/inference/jobs/): checked at submission like the
synchronous route, run by a work-queue worker, charged once per job, visible to the submitter
only. On both databases."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

from flplatform import workqueue
from flplatform.blobs import open_store
from flplatform.inference.jobs import INFERENCE_JOB, billing_key
from flplatform.orm.billing import OperationKind
from flplatform.settings import Settings
from tests.billing.conftest import books, usd  # noqa: F401  (fixture)
from tests.inference.conftest import DropoutMLP

X = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]]
MC = {"uncertainty_method": "MC_DROPOUT", "options": {"N": 5, "softmax": True, "seed": 1}}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


async def submit(client: httpx.AsyncClient, account: Any, **body: Any) -> httpx.Response:
    return await client.post("/api/inference/jobs/", json=body, headers=account.headers)


async def wait_for(
    client: httpx.AsyncClient, account: Any, url: str, timeout: float = 20.0
) -> dict[str, Any]:
    """Poll until the job is done or failed (the test app's in-process worker runs it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        response = await client.get(url, headers=account.headers)
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in ("done", "error") or loop.time() > deadline:
            return job
        await asyncio.sleep(0.05)


async def operations(books: Any, user_id: uuid.UUID) -> int:  # noqa: F811
    from flplatform import billing

    _, total = await books.run(
        lambda s: billing.list_operations(s, user_id=user_id, kind=OperationKind.INFERENCE)
    )
    return total


# --------------------------------------------------------------------------- with the in-process worker


async def test_job_result_is_the_sync_result_charged_once_and_private(
    app, client, alice, bob, admin, add_model, books
):  # noqa: F811
    model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    await books.price("inference_sample", usd("0.1"))
    await books.top_up(alice.user.id, usd(1))
    body = {"model_id": str(model_id), "model_input": X, **MC}
    sync = await client.post("/api/inference/", json=body, headers=alice.headers)
    assert sync.status_code == 200, sync.text

    accepted = await submit(client, alice, **body)
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert job["status"] in ("waiting", "processing", "done") and job["result"] is None
    assert accepted.headers["location"] == job["url"] == f"/api/inference/jobs/{job['id']}/"
    assert job["model_id"] == str(model_id)

    done = await wait_for(client, alice, job["url"])
    assert done["status"] == "done", done
    assert done["result"] == sync.json()  # the same body as the synchronous route, exactly
    assert done["attempts"] == 1 and done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    async with app.state.sessionmaker() as session:
        row = await workqueue.get_job(session, uuid.UUID(job["id"]))
    assert row is not None and row.payload == {}  # the input is dropped once the job has ended
    assert await books.balance(alice.user.id) == usd("0.6")  # 2 rows x 0.1, for each of the two inferences
    assert await operations(books, alice.user.id) == 2

    # The submitter's only; superusers see it too; listing shows one's own jobs.
    assert (await client.get(job["url"], headers=bob.headers)).status_code == 404
    assert (await client.get(job["url"], headers=admin.headers)).json()["status"] == "done"
    assert (
        await client.get(f"/api/inference/jobs/{uuid.uuid4()}/", headers=alice.headers)
    ).status_code == 404
    assert (await client.get("/api/inference/jobs/", headers=bob.headers)).json() == []
    listed = await client.get("/api/inference/jobs/?status=done", headers=alice.headers)
    assert listed.headers["x-total-count"] == "1" and [j["id"] for j in listed.json()] == [job["id"]]
    assert listed.json()[0]["result"] is None  # results only from the job's own URL
    assert (await client.get("/api/inference/jobs/?status=error", headers=alice.headers)).json() == []

    # Multipart, as the synchronous route takes it: an uploaded .npy file; the result is JSON.
    form = await client.post(
        "/api/inference/jobs/",
        data={
            "model_id": str(model_id),
            "uncertainty_method": "MC_DROPOUT",
            "options": '{"N": 5, "softmax": true, "seed": 1}',
        },
        files={"model_input": ("x.npy", npy_bytes(np.array(X, dtype=np.float32)))},
        headers=alice.headers,
    )
    assert form.status_code == 202, form.text
    assert (await wait_for(client, alice, form.json()["url"]))["result"] == sync.json()
    # The uploaded input waited in the blob store (the job's JSON named its digest), not in the row.
    digest = hashlib.sha256(npy_bytes(np.array(X, dtype=np.float32))).hexdigest()
    assert await open_store(app.state.settings).exists(digest)


async def test_bad_requests_are_refused_at_submission(client, alice, bob, add_model, books):  # noqa: F811
    model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
    ok = {"model_id": str(model_id), "model_input": X}
    cases = [
        ({**ok, "model_id": str(uuid.uuid4())}, alice, 404, "not_found"),
        (ok, bob, 404, "not_found"),  # a private model of someone else
        ({**ok, "model_input": [[1.0, 2.0, 3.0]]}, alice, 400, "input_shape_mismatch"),
        ({**ok, "model_input": "not base64!"}, alice, 400, "invalid_model_input"),
        ({**ok, "return_format": "binary"}, alice, 400, "binary_not_supported"),
        ({**ok, "uncertainty_method": "SWAG"}, alice, 400, "method_not_applicable"),
        ({**ok, "options": {"N": 10_000}}, alice, 422, "too_many_samples"),
        ({**ok, "surprise": 1}, alice, 422, "validation_error"),
    ]
    for body, account, status, code in cases:
        response = await submit(client, account, **body)
        assert (response.status_code, response.json()["code"]) == (status, code), (body, response.text)
    unsupported = await client.post(
        "/api/inference/jobs/", content=b"x", headers={**alice.headers, "content-type": "text/plain"}
    )
    assert unsupported.status_code == 415

    # Billing would refuse: 402 now, and nothing is queued or charged.
    await books.price("inference_sample", usd("0.1"))
    refused = await submit(client, alice, **ok)
    assert refused.status_code == 402 and refused.json()["code"] == "insufficient_funds"
    assert (await client.get("/api/inference/jobs/", headers=alice.headers)).json() == []
    assert await operations(books, alice.user.id) == 0
    assert (await books.reconcile()).ok


# --------------------------------------------------------------------------- no worker: the test drives the queue


class TestWithoutWorker:
    """An app without an in-process worker (``FLP_INPROCESS_WORKER=false``): jobs wait until the
    test claims and runs them, as a `flplatform worker` elsewhere would."""

    @pytest.fixture
    def settings(self, db_url: str) -> Settings:
        return Settings(database_url=db_url, inprocess_worker=False, work_max_attempts=2)

    async def test_startup_warns_that_jobs_need_a_worker(self, caplog, app):
        messages = [r.getMessage() for r in caplog.get_records("setup") if r.levelno >= logging.WARNING]
        assert any(
            "flplatform worker" in m and "inference jobs" in m and "FLP_INPROCESS_WORKER=false" in m
            for m in messages
        ), messages

    async def test_a_job_run_again_after_its_lease_expired_is_charged_once(
        self, app, client, alice, add_model, books
    ):  # noqa: F811
        model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
        await books.price("inference_sample", usd("0.1"))
        await books.top_up(alice.user.id, usd(1))
        accepted = await submit(client, alice, model_id=str(model_id), model_input=X, **MC)
        assert accepted.status_code == 202
        job_id = uuid.UUID(accepted.json()["id"])
        await asyncio.sleep(0.1)
        assert (await client.get(accepted.json()["url"], headers=alice.headers)).json()["status"] == "waiting"

        # A worker claims the job, runs it to the end (its charge commits) and dies before it
        # records the outcome: the lease expires and another worker runs the job again.
        maker = app.state.sessionmaker
        first = await workqueue.claim(maker, lease_seconds=0.2, kinds=[INFERENCE_JOB])
        assert first is not None and first.id == job_id and first.attempt == 1
        context = workqueue.JobContext(
            sessionmaker=maker, settings=app.state.settings, job_id=first.id, attempt=first.attempt, app=app
        )
        first_result = await workqueue.lookup(INFERENCE_JOB).handler(context, first.payload)
        assert await books.balance(alice.user.id) == usd("0.8")
        await asyncio.sleep(0.3)
        assert await workqueue.Worker(maker, app.state.settings, name="second").run_once()
        assert not await workqueue.finish(maker, first, first_result), "the lost claim recorded an outcome"

        job = await wait_for(client, alice, accepted.json()["url"], timeout=1)
        assert job["status"] == "done" and job["attempts"] == 2
        assert job["result"] == first_result
        assert await books.balance(alice.user.id) == usd("0.8"), "the job was charged twice"
        assert await operations(books, alice.user.id) == 1
        from flplatform.billing import operation_by_key

        assert await books.run(lambda s: operation_by_key(s, billing_key(job_id))) is not None
        assert (await books.reconcile()).ok

    async def test_a_job_lost_max_attempts_times_ends_in_lease_expired(
        self, app, client, alice, add_model, books
    ):  # noqa: F811
        model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
        accepted = await submit(client, alice, model_id=str(model_id), model_input=X)
        assert accepted.status_code == 202
        maker = app.state.sessionmaker
        for attempt in (1, 2):  # FLP_WORK_MAX_ATTEMPTS=2: two workers die holding it
            claimed = await workqueue.claim(maker, lease_seconds=0.05, kinds=[INFERENCE_JOB])
            assert claimed is not None and claimed.attempt == attempt
            await asyncio.sleep(0.1)
        assert await workqueue.claim(maker, lease_seconds=0.05, kinds=[INFERENCE_JOB]) is None
        job = (await client.get(accepted.json()["url"], headers=alice.headers)).json()
        assert job["status"] == "error" and job["attempts"] == 2 and job["result"] is None
        assert job["error"]["code"] == "lease_expired" and job["error"]["status"] == 503
        assert "lease expired" in job["error"]["detail"]
        assert job["finished_at"] is not None
        async with maker() as session:
            row = await workqueue.get_job(session, uuid.UUID(job["id"]))
        assert row is not None and row.error["type"] == "LeaseExpired"
        assert row.payload == {}  # an ended job keeps no input

    async def test_a_refusal_at_run_time_is_the_jobs_error_and_charges_nothing(
        self, app, client, alice, add_model, books
    ):  # noqa: F811
        model_id = await add_model(alice, DropoutMLP(), input_shape=[None, 4])
        accepted = await submit(client, alice, model_id=str(model_id), model_input=X)
        assert accepted.status_code == 202
        await books.price("inference_sample", usd("0.1"))  # the price rose after submission: no funds
        assert await workqueue.Worker(app.state.sessionmaker, app.state.settings, name="w").run_once()
        job = (await client.get(accepted.json()["url"], headers=alice.headers)).json()
        assert job["status"] == "error" and job["result"] is None
        assert job["error"] == {"detail": job["error"]["detail"], "code": "insufficient_funds", "status": 402}
        assert await operations(books, alice.user.id) == 0
