"""Two real uvicorn worker processes on one PostgreSQL: exactly-once rounds under concurrent
uploads (aggregation runs as a work-queue job claimed by either process), correct FedAvg, billed
once per round with a conserved ledger; and crash-safe resume after ``kill -9`` of every process,
including a worker that died in the middle of the aggregation job."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import func, select

from flplatform import workqueue
from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm import GlobalModelRound, LocalModel, Server, Training
from flplatform.orm.workqueue import QueuedWork, WorkStatus
from flplatform.trainings.runtime import AGGREGATE_JOB
from tests.scale.conftest import WORK_LEASE_SECONDS
from tests.scale.harness import (
    Account,
    Fleet,
    SmallNet,
    admin_headers,
    as_safetensors,
    client_update,
    create_account,
    create_admin,
    fedavg,
    post_update,
    reconciles,
    scripted,
    set_training_prices,
    state_of,
    top_up,
    training_charges,
    training_state,
    upload_model,
    usd_balance,
    wait_for,
)

pytestmark = [pytest.mark.postgres_only, pytest.mark.slow]

CLIENTS = 20
ROUNDS = 3


# The price list of these tests: $1 per update + $0.01 per sample (one epoch); a round reserves
# $1 + $0.01 × 100 samples per participant (every sample size below is under 100).
PRICE_UPDATE, PRICE_SAMPLE, RESERVE_SAMPLES = Decimal("1"), Decimal("0.01"), 100
TOP_UP = Decimal("1000")


def sample_size(client: int) -> int:
    return 5 + 3 * client  # distinct weights, so a lost or doubled update changes the average


def round_cost(clients: int) -> Decimal:
    return PRICE_UPDATE * clients + PRICE_SAMPLE * sum(sample_size(i) for i in range(clients))


async def _setup(
    http: httpx.AsyncClient, urls: list[str], clients: int, rounds: int
) -> tuple[Account, list[Account], str, str, dict[str, torch.Tensor]]:
    admin = await admin_headers(http, urls[0])
    await set_training_prices(
        http,
        urls[0],
        admin,
        update=str(PRICE_UPDATE),
        sample_epoch=str(PRICE_SAMPLE),
        reserve_samples=RESERVE_SAMPLES,
    )
    actor = await create_account(http, urls[0], admin, "actor", actor=True)
    await top_up(http, urls[1 % len(urls)], admin, actor.id, str(TOP_UP))
    accounts = list(
        await asyncio.gather(
            *(
                create_account(http, urls[i % len(urls)], admin, f"client-{i:02d}", client=True)
                for i in range(clients)
            )
        )
    )
    torch.manual_seed(7)
    initial = scripted(SmallNet())
    model_id = await upload_model(http, urls[1 % len(urls)], actor.headers, initial)
    body = {
        "model_id": model_id,
        "target_num_updates": rounds,
        "aggregation_method": "FedAvg",
        "clients": [a.id for a in accounts],
        "options": {"skip_model_tests": True},
    }
    r = await http.post(f"{urls[0]}/api/trainings/", headers=actor.headers, json=body)
    assert r.status_code == 201, r.text
    training_id = r.json()["training_id"]
    r = await http.post(f"{urls[1 % len(urls)]}/api/trainings/{training_id}/start/", headers=actor.headers)
    assert r.status_code == 202, r.text
    return actor, accounts, model_id, training_id, state_of(initial)


async def _download(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], model_id: str, round_: int | None = None
) -> dict[str, torch.Tensor]:
    params = {} if round_ is None else {"round": round_}
    r = await http.get(f"{url}/api/models/{model_id}/", headers=headers, params=params)
    assert r.status_code == 200, r.text
    return state_of(r.content)


async def _db_counts(db_url: str, model_id: str, training_id: str) -> dict[str, Any]:
    engine = create_engine(db_url)
    try:
        async with create_sessionmaker(engine)() as session:
            mid = uuid.UUID(model_id)
            history = (
                await session.execute(
                    select(GlobalModelRound.round, func.count())
                    .where(GlobalModelRound.model_id == mid)
                    .group_by(GlobalModelRound.round)
                )
            ).all()
            updates = (
                await session.execute(
                    select(LocalModel.round, func.count(), func.count(func.distinct(LocalModel.owner_id)))
                    .where(LocalModel.base_model_id == mid)
                    .group_by(LocalModel.round)
                )
            ).all()
            training = (
                await session.execute(
                    select(Training.locked, Training.locked_until).where(
                        Training.id == uuid.UUID(training_id)
                    )
                )
            ).one()
            jobs = (
                (
                    await session.execute(
                        select(QueuedWork)
                        .where(QueuedWork.handler == AGGREGATE_JOB)
                        .order_by(QueuedWork.created_at)
                    )
                )
                .scalars()
                .all()
            )
            servers = dict((await session.execute(select(Server.id, Server.name))).all())
            ledger_ok: bool | None = None
            try:
                from flplatform.billing.ledger import reconcile
            except ImportError:  # billing not present: nothing to conserve
                pass
            else:
                ledger_ok = (await reconcile(session)).ok
    finally:
        await engine.dispose()
    return {
        "history_rows": {r: c for r, c in history},
        "updates": {r: (rows, owners) for r, rows, owners in updates},
        "locked": training.locked,
        "locked_until": training.locked_until,
        "ledger_ok": ledger_ok,
        "jobs": [(j.payload["round"], j.status, j.attempts, j.result) for j in jobs],
        "job_servers": [servers.get(j.server_id, "") for j in jobs],
    }


async def _assert_billed_once(
    http: httpx.AsyncClient, url: str, actor: Account, clients: int, rounds: int
) -> None:
    """One training charge per round at the price list's figure, nothing held, ledger conserved."""
    admin = await admin_headers(http, url)
    charges = await training_charges(http, url, admin, actor.id)
    assert sorted(c["round"] for c in charges) == list(range(rounds)), charges
    assert all(Decimal(c["amount"]) == round_cost(clients) for c in charges), charges
    assert await usd_balance(http, url, admin, actor.id) == (TOP_UP - rounds * round_cost(clients), 0)
    report = await reconciles(http, url, admin)
    assert report["ok"], report
    assert all(total == 0 for total in report["totals_by_currency"].values()), report


def test_twenty_clients_two_workers_exactly_once(db_url: str, workers: Fleet) -> None:
    """20 clients upload concurrently, alternating between two worker processes; every round
    aggregates exactly once, to the FedAvg of exactly the 20 uploaded updates."""
    create_admin(db_url)
    asyncio.run(_twenty_clients(db_url, workers.ensure(2)))


async def _twenty_clients(db_url: str, urls: list[str]) -> None:
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as http:
        actor, accounts, model_id, training_id, initial = await _setup(http, urls, CLIENTS, ROUNDS)
        uploaded: dict[int, list[dict[str, torch.Tensor]]] = {}

        async def participant(index: int, account: Account, round_: int, start: asyncio.Event) -> None:
            url = urls[index % 2]
            glob = await _download(http, url, account.headers, model_id)
            state = client_update(glob, index, round_)
            uploaded.setdefault(round_, [None] * CLIENTS)[index] = state  # type: ignore[list-item]
            data = as_safetensors(state)
            await start.wait()  # everyone uploads at once: the round's last updates race
            r = await post_update(http, url, account.headers, model_id, data, round_, sample_size(index))
            assert r.status_code == 201, r.text
            if index % 5 == 0:
                # The same upload retried through the OTHER worker (a client that timed out and
                # retried): it replaces itself, or is refused once the round has moved on.
                r = await post_update(
                    http, urls[(index + 1) % 2], account.headers, model_id, data, round_, sample_size(index)
                )
                assert r.status_code in (201, 400, 409), r.text

        for round_ in range(ROUNDS):
            await wait_for(
                http,
                urls[round_ % 2],
                actor.headers,
                training_id,
                lambda s, r=round_: s["round"] == r and s["phase"] == "update" and not s["locked"],
                what=f"round {round_} open",
            )
            start = asyncio.Event()
            tasks = [asyncio.create_task(participant(i, a, round_, start)) for i, a in enumerate(accounts)]
            await asyncio.sleep(0.05)
            start.set()
            await asyncio.gather(*tasks)
            if round_ < ROUNDS - 1:
                await wait_for(
                    http,
                    urls[(round_ + 1) % 2],
                    actor.headers,
                    training_id,
                    lambda s, r=round_: (s["round"] or 0) > r,
                    what=f"round {round_} aggregated",
                )

        final = await wait_for(
            http, urls[0], actor.headers, training_id, lambda s: s["state"] == "C", what="training completed"
        )
        assert final["round"] == ROUNDS
        assert final["locked"] is False
        await _assert_billed_once(http, urls[1], actor, CLIENTS, ROUNDS)

        # Each round's global model is the FedAvg of exactly that round's 20 updates.
        sizes = [sample_size(i) for i in range(CLIENTS)]
        previous = initial
        for round_ in range(ROUNDS):
            got = await _download(http, urls[round_ % 2], actor.headers, model_id, round_ + 1)
            expected = fedavg(uploaded[round_], sizes)
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
            # The clients trained from the previous round's model, not a stale or doubled one.
            assert torch.allclose(
                uploaded[round_][0]["fc1.bias"], client_update(previous, 0, round_)["fc1.bias"]
            )
            previous = got

    counts = await _db_counts(db_url, model_id, training_id)
    # One history entry per round (round 0 is the uploaded model), never two.
    assert counts["history_rows"] == {r: 1 for r in range(ROUNDS + 1)}, counts
    for round_ in range(ROUNDS):
        rows, owners = counts["updates"][round_]
        assert owners == CLIENTS, counts["updates"]
    assert counts["locked"] is False
    assert counts["ledger_ok"] is True, "billing ledger does not reconcile"
    # Aggregation went through the work queue: one job per round, all finished.
    assert sorted(r for r, *_ in counts["jobs"]) == list(range(ROUNDS)), counts["jobs"]
    assert all(status == WorkStatus.FINISHED for _, status, *_ in counts["jobs"]), counts["jobs"]


def test_kill9_mid_round_resumes_exactly_once(db_url: str, workers: Fleet) -> None:
    """Half a round uploaded, then every process SIGKILLed. Restarted (HTTP only), the pre-crash
    updates are still there and the rest arrive: the round is claimed and its aggregation job
    queued. A worker takes the job and dies with it (its claim is taken, never renewed), and
    every process is SIGKILLed again. Restarted as an HTTP-only server plus a separate
    `flplatform worker`, that worker reclaims the job once its lease expired: the round
    aggregates exactly once to the FedAvg of all six updates and is charged once (the billing
    hooks run in the job-only process too)."""
    create_admin(db_url)
    clients = 6
    setup = asyncio.run(_crash_first_half(workers.ensure(2), clients))
    workers.kill9()
    urls = workers.start(1, FLP_INPROCESS_WORKER="false")  # serves HTTP, runs no jobs
    asyncio.run(_crash_second_half(db_url, urls, *setup))
    workers.kill9()
    job_worker = workers.start_job_worker()  # imports while the server below starts
    urls = workers.start(1, FLP_INPROCESS_WORKER="false")
    asyncio.run(_crash_resume(db_url, urls * 2, *setup, job_worker_pid=job_worker.pid))


async def _crash_first_half(urls: list[str], clients: int) -> Any:
    async with httpx.AsyncClient(timeout=60.0) as http:
        actor, accounts, model_id, training_id, initial = await _setup(http, urls, clients, 1)
        await wait_for(
            http, urls[0], actor.headers, training_id, lambda s: s["phase"] == "update" and s["round"] == 0
        )
        uploaded: dict[int, dict[str, torch.Tensor]] = {}
        for index in range(clients // 2):
            uploaded[index] = client_update(initial, index, 0)
            r = await post_update(
                http,
                urls[index % 2],
                accounts[index].headers,
                model_id,
                as_safetensors(uploaded[index]),
                0,
                sample_size(index),
            )
            assert r.status_code == 201, r.text
        state = await training_state(http, urls[1], actor.headers, training_id)
        assert state["local_models_arrived"] == clients // 2
        return actor, accounts, model_id, training_id, uploaded


async def _crash_second_half(
    db_url: str,
    urls: list[str],
    actor: Account,
    accounts: list[Account],
    model_id: str,
    training_id: str,
    uploaded: dict[int, dict[str, torch.Tensor]],
) -> None:
    clients = len(accounts)
    async with httpx.AsyncClient(timeout=60.0) as http:
        state = await training_state(http, urls[0], actor.headers, training_id)
        assert state["state"] == "O" and state["round"] == 0
        assert state["local_models_arrived"] == clients // 2, "updates accepted before the crash were lost"
        initial = await _download(http, urls[0], actor.headers, model_id, 0)
        for index in range(clients // 2, clients):
            uploaded[index] = client_update(initial, index, 0)
            r = await post_update(
                http,
                urls[0],
                accounts[index].headers,
                model_id,
                as_safetensors(uploaded[index]),
                0,
                sample_size(index),
            )
            assert r.status_code == 201, r.text
        await wait_for(http, urls[0], actor.headers, training_id, lambda s: s["locked"], what="round claimed")
    engine = create_engine(db_url)
    try:
        sessionmaker = create_sessionmaker(engine)
        # The claim and its job were committed together; no process runs jobs, so it waits.
        async with sessionmaker() as session:
            jobs = (
                (await session.execute(select(QueuedWork).where(QueuedWork.handler == AGGREGATE_JOB)))
                .scalars()
                .all()
            )
        assert [(j.status, j.payload["round"]) for j in jobs] == [(WorkStatus.WAITING, 0)]
        # A worker claims it exactly as `flplatform worker` does — and dies: no renewal, no outcome.
        job = await workqueue.claim(sessionmaker, lease_seconds=WORK_LEASE_SECONDS, kinds=[AGGREGATE_JOB])
        assert job is not None and job.attempt == 1
    finally:
        await engine.dispose()


async def _crash_resume(
    db_url: str,
    urls: list[str],
    actor: Account,
    accounts: list[Account],
    model_id: str,
    training_id: str,
    uploaded: dict[int, dict[str, torch.Tensor]],
    *,
    job_worker_pid: int,
) -> None:
    clients = len(accounts)
    async with httpx.AsyncClient(timeout=60.0) as http:
        final = await wait_for(
            http,
            urls[1],
            actor.headers,
            training_id,
            lambda s: s["state"] == "C",
            timeout=30 + WORK_LEASE_SECONDS,
            what="training completed after the crash",
        )
        assert final["round"] == 1 and final["locked"] is False
        got = await _download(http, urls[0], actor.headers, model_id, 1)
        expected = fedavg([uploaded[i] for i in range(clients)], [sample_size(i) for i in range(clients)])
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
        await _assert_billed_once(http, urls[0], actor, clients, 1)
    counts = await _db_counts(db_url, model_id, training_id)
    assert counts["history_rows"] == {0: 1, 1: 1}, counts
    assert counts["updates"][0][1] == clients
    assert counts["locked"] is False and counts["locked_until"] is None
    # The dead worker's job was reclaimed (second claim) and finished; no second job was made.
    [(round_, status, attempts, result)] = counts["jobs"]
    assert (round_, status) == (0, WorkStatus.FINISHED) and attempts >= 2, counts["jobs"]
    # ... by the `flplatform worker` process (its Server row is named host:pid:…).
    assert [f":{job_worker_pid}:" in name for name in counts["job_servers"]] == [True], counts["job_servers"]
    assert counts["ledger_ok"] is True, "billing ledger does not reconcile"
