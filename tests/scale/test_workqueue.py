"""The work queue: basics on both databases; real concurrent claimers and lease takeover on
PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.util import await_only

from flplatform import workqueue
from flplatform.app import create_app
from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm import Server
from flplatform.orm.workqueue import QueuedWork, WorkKind, WorkStatus
from flplatform.settings import Settings

CALLS: list[tuple[str, dict[str, Any]]] = []


@workqueue.handler("test.echo")
async def _echo(ctx: workqueue.JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    CALLS.append(("echo", payload))
    return {"echo": payload, "attempt": ctx.attempt}


@workqueue.handler("test.fail", category=WorkKind.INFERENCE)
async def _fail(ctx: workqueue.JobContext, payload: dict[str, Any]) -> None:
    raise RuntimeError(f"handler refused {payload.get('n')}")


@workqueue.handler("test.slow")
async def _slow(ctx: workqueue.JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(float(payload["seconds"]))
    return {"slept": payload["seconds"]}


@pytest.fixture
async def maker(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(db_url)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


def _settings(db_url: str, **fields: Any) -> Settings:
    fields.setdefault("worker_poll_interval_seconds", 0.1)
    return Settings(database_url=db_url, **fields)


async def _enqueue(
    maker: async_sessionmaker[AsyncSession], kind: str, payload: dict[str, Any] | None = None, **kw: Any
) -> uuid.UUID:
    async with maker() as session:
        job = await workqueue.enqueue(session, kind, payload, **kw)
        await session.commit()
        return job.id


async def _job(maker: async_sessionmaker[AsyncSession], job_id: uuid.UUID) -> QueuedWork:
    async with maker() as session:
        job = await workqueue.get_job(session, job_id)
        assert job is not None
        return job


# --------------------------------------------------------------------------- both databases


async def test_enqueue_claim_finish_records_timings(maker: async_sessionmaker[AsyncSession]) -> None:
    job_id = await _enqueue(maker, "test.echo", {"x": 1}, estimate_seconds=2.5)
    waiting = await _job(maker, job_id)
    assert (waiting.status, waiting.kind, waiting.handler, waiting.attempts) == (
        WorkStatus.WAITING,
        WorkKind.AGGREGATION,
        "test.echo",
        0,
    )
    assert waiting.duration_estimate_seconds == 2.5 and waiting.started_at is None

    claimed = await workqueue.claim(maker, lease_seconds=30)
    assert (
        claimed is not None and claimed.id == job_id and claimed.payload == {"x": 1} and claimed.attempt == 1
    )
    assert await workqueue.claim(maker, lease_seconds=30) is None, "a claimed job was handed out twice"
    running = await _job(maker, job_id)
    assert running.status == WorkStatus.PROCESSING and running.started_at is not None and running.lease_until

    assert await workqueue.finish(maker, claimed, {"ok": True})
    done = await _job(maker, job_id)
    assert done.status == WorkStatus.FINISHED and done.result == {"ok": True} and done.lease_until is None
    assert done.finished_at is not None and done.finished_at >= done.started_at >= done.created_at
    assert not await workqueue.finish(maker, claimed), "a finished job was finished again"


async def test_dedupe_key_makes_enqueue_idempotent(maker: async_sessionmaker[AsyncSession]) -> None:
    first = await _enqueue(maker, "test.echo", {"n": 1}, dedupe_key="training:t:round:0:update")
    again = await _enqueue(maker, "test.echo", {"n": 2}, dedupe_key="training:t:round:0:update")
    async with maker() as session:  # twice in one transaction as well
        a = await workqueue.enqueue(session, "test.echo", dedupe_key="k2")
        b = await workqueue.enqueue(session, "test.echo", dedupe_key="k2")
        await session.commit()
    assert first == again and a.id == b.id
    async with maker() as session:
        assert (await session.execute(select(func.count()).select_from(QueuedWork))).scalar_one() == 2
    assert (await _job(maker, first)).payload == {"n": 1}


async def test_unknown_kind_is_refused(maker: async_sessionmaker[AsyncSession]) -> None:
    async with maker() as session:
        with pytest.raises(ValueError, match="unknown job kind"):
            await workqueue.enqueue(session, "test.nobody-handles-this")


async def test_worker_runs_handlers_and_records_errors(
    db_url: str, maker: async_sessionmaker[AsyncSession]
) -> None:
    ok = await _enqueue(maker, "test.echo", {"n": 7})
    bad = await _enqueue(maker, "test.fail", {"n": 8})
    stop = asyncio.Event()
    runner = asyncio.create_task(
        workqueue.run_worker(maker, _settings(db_url), name="test-worker", stop=stop)
    )
    try:
        for _ in range(200):
            states = {(await _job(maker, j)).status for j in (ok, bad)}
            if states <= {WorkStatus.FINISHED, WorkStatus.ERROR}:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await runner
    done, failed = await _job(maker, ok), await _job(maker, bad)
    assert done.status == WorkStatus.FINISHED and done.result == {"echo": {"n": 7}, "attempt": 1}
    assert failed.status == WorkStatus.ERROR and failed.kind == WorkKind.INFERENCE
    assert failed.error == {"message": "handler refused 8", "type": "RuntimeError"}
    async with maker() as session:
        server = (await session.execute(select(Server).where(Server.name == "test-worker"))).scalar_one()
    assert done.server_id == server.id and server.ready is False  # deregistered on stop
    assert isinstance(server.gpu_memory, list)


async def test_expired_lease_is_reclaimed_and_the_old_claim_fenced(
    maker: async_sessionmaker[AsyncSession],
) -> None:
    job_id = await _enqueue(maker, "test.echo", {"n": 1})
    first = await workqueue.claim(maker, lease_seconds=0.2)
    assert first is not None
    assert await workqueue.claim(maker, lease_seconds=0.2) is None
    await asyncio.sleep(0.3)  # the first worker "died": no renewal
    second = await workqueue.claim(maker, lease_seconds=30)
    assert second is not None and second.id == job_id and second.attempt == 2
    assert not await workqueue.renew(maker, first, 30), "a dead claim renewed a lease it no longer holds"
    assert not await workqueue.finish(maker, first, {"by": "first"})
    assert await workqueue.finish(maker, second, {"by": "second"})
    assert (await _job(maker, job_id)).result == {"by": "second"}


async def test_running_job_keeps_its_lease(db_url: str, maker: async_sessionmaker[AsyncSession]) -> None:
    job_id = await _enqueue(maker, "test.slow", {"seconds": 1.0})
    settings = _settings(db_url, work_lease_seconds=0.3)
    worker = workqueue.Worker(maker, settings, name="slow-worker")
    task = asyncio.create_task(worker.run_once())
    await asyncio.sleep(0.6)  # twice the lease: renewed meanwhile, so nobody may take it over
    assert await workqueue.claim(maker, lease_seconds=0.3) is None
    assert await task
    job = await _job(maker, job_id)
    assert job.status == WorkStatus.FINISHED and job.attempts == 1


async def test_a_job_preferring_its_process_waits_for_that_worker_first(
    maker: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``enqueue(prefer_local=True)`` reserves the job for this process's worker (a round's close
    where its updates were folded) for a head start; then any worker takes it as usual."""
    from flplatform.workqueue import queue

    async with maker() as session:
        here, there = Server(name="here"), Server(name="there")
        session.add_all([here, there])
        await session.commit()
        here_id, there_id = here.id, there.id

    class LocalWorker:
        server_id, kinds = here_id, None

        def kick(self) -> None:
            pass

    local = LocalWorker()
    monkeypatch.setattr(queue, "LOCAL_WORKERS", {local})
    reserved = await _enqueue(maker, "test.echo", {"n": 1}, prefer_local=True)
    assert (await _job(maker, reserved)).server_id == here_id
    assert await workqueue.claim(maker, lease_seconds=30, server_id=there_id) is None
    assert await workqueue.claim(maker, lease_seconds=30) is None  # a worker without a server row too
    claimed = await workqueue.claim(maker, lease_seconds=30, server_id=here_id)
    assert claimed is not None and claimed.id == reserved

    monkeypatch.setattr(queue, "LOCAL_HEAD_START_SECONDS", 0.2)
    later = await _enqueue(maker, "test.echo", {"n": 2}, prefer_local=True)
    assert await workqueue.claim(maker, lease_seconds=30, server_id=there_id) is None
    await asyncio.sleep(0.3)  # the head start is over: anyone
    taken = await workqueue.claim(maker, lease_seconds=30, server_id=there_id)
    assert taken is not None and taken.id == later

    LocalWorker.kinds = ["test.other"]  # this process's worker does not take the kind: no reservation
    free = await _enqueue(maker, "test.echo", {"n": 3}, prefer_local=True)
    assert (await _job(maker, free)).server_id is None
    monkeypatch.setattr(queue, "LOCAL_WORKERS", set())
    free2 = await _enqueue(maker, "test.echo", {"n": 4}, prefer_local=True)
    got = {
        (await workqueue.claim(maker, lease_seconds=30, server_id=there_id)).id,  # type: ignore[union-attr]
        (await workqueue.claim(maker, lease_seconds=30, server_id=there_id)).id,  # type: ignore[union-attr]
    }
    assert got == {free, free2}


async def test_job_lost_too_often_becomes_an_error(maker: async_sessionmaker[AsyncSession]) -> None:
    job_id = await _enqueue(maker, "test.echo", max_attempts=2)
    for _ in range(2):
        assert await workqueue.claim(maker, lease_seconds=0.05) is not None
        await asyncio.sleep(0.1)
    assert await workqueue.claim(maker, lease_seconds=0.05) is None
    job = await _job(maker, job_id)
    assert job.status == WorkStatus.ERROR and job.error["type"] == "LeaseExpired"


async def test_serve_runs_an_inprocess_worker(db_url: str) -> None:
    app = create_app(_settings(db_url, worker_poll_interval_seconds=5.0))
    async with app.router.lifespan_context(app):
        assert app.state.work_worker is not None
        job_id = await _enqueue(app.state.sessionmaker, "test.echo", {"inprocess": True})
        for _ in range(100):  # woken by the commit, long before the 5 s poll
            if (await _job(app.state.sessionmaker, job_id)).status == WorkStatus.FINISHED:
                break
            await asyncio.sleep(0.02)
        assert (await _job(app.state.sessionmaker, job_id)).status == WorkStatus.FINISHED
    off = create_app(_settings(db_url, inprocess_worker=False))
    async with off.router.lifespan_context(off):
        assert off.state.work_worker is None


# --------------------------------------------------------------------------- PostgreSQL concurrency


@pytest.mark.postgres_only
async def test_concurrent_claimers_take_each_job_exactly_once(db_url: str) -> None:
    jobs = 120
    seed_engine = create_engine(db_url)
    seed = create_sessionmaker(seed_engine)
    async with seed() as session:
        for n in range(jobs):
            await workqueue.enqueue(session, "test.echo", {"n": n})
        await session.commit()
    await seed_engine.dispose()

    claims: list[uuid.UUID] = []

    async def claimer() -> None:
        engine = create_engine(db_url)  # its own pool: separate connections, like separate processes
        maker = create_sessionmaker(engine)
        try:
            while (job := await workqueue.claim(maker, lease_seconds=30)) is not None:
                claims.append(job.id)
                assert await workqueue.finish(maker, job)
        finally:
            await engine.dispose()

    await asyncio.gather(*(claimer() for _ in range(8)))
    counts = Counter(claims)
    assert len(counts) == jobs and max(counts.values()) == 1, "a job was claimed twice"
    engine = create_engine(db_url)
    async with create_sessionmaker(engine)() as session:
        rows = (await session.execute(select(QueuedWork.status, QueuedWork.attempts))).all()
    await engine.dispose()
    assert {(s, a) for s, a in rows} == {(WorkStatus.FINISHED, 1)} and len(rows) == jobs


@pytest.mark.postgres_only
async def test_concurrent_enqueues_with_one_key_make_one_job(db_url: str) -> None:
    async def enqueue_once() -> uuid.UUID:
        engine = create_engine(db_url)
        try:
            async with create_sessionmaker(engine)() as session:
                job = await workqueue.enqueue(session, "test.echo", dedupe_key="same-round")
                await asyncio.sleep(0.05)  # hold the transaction open while the others insert
                await session.commit()
                return job.id
        finally:
            await engine.dispose()

    ids = await asyncio.gather(*(enqueue_once() for _ in range(6)))
    assert len(set(ids)) == 1


@pytest.mark.postgres_only
async def test_a_claim_that_read_a_stale_attempt_count_takes_nothing(db_url: str) -> None:
    """PostgreSQL re-checks a row it locks after a concurrent commit against that row's new
    version, but reads the joined queue row as of its snapshot. So a claimer can lock a job that
    another claimer has just taken over and still see the old, expired lease and attempt count.
    That claim must take nothing: before the fix both claimers ran the job with one recorded attempt."""
    engine = create_engine(db_url)
    maker = create_sessionmaker(engine)
    rival = create_engine(db_url)
    try:
        job_id = await _enqueue(maker, "test.echo", {"stale": True})
        assert await workqueue.claim(maker, lease_seconds=0.01) is not None
        await asyncio.sleep(0.05)  # the first claim's lease has run out

        async def take_over() -> None:
            # Another worker's committed takeover, landing after our claimer read the queue row.
            async with rival.begin() as conn:
                await conn.execute(
                    text(
                        "UPDATE queued_works SET attempts = attempts + 1, "
                        "lease_until = now() + interval '1 hour' WHERE id = :id"
                    ),
                    {"id": job_id},
                )

        raced = False

        def before_claim_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            nonlocal raced
            if not raced and statement.lstrip().upper().startswith("UPDATE WORKS"):
                raced = True
                await_only(take_over())

        event.listen(engine.sync_engine, "before_cursor_execute", before_claim_update)
        assert await workqueue.claim(maker, lease_seconds=30) is None
        assert raced
        assert (await _job(maker, job_id)).attempts == 2  # the rival's claim, and only it
    finally:
        await rival.dispose()
        await engine.dispose()


@pytest.mark.postgres_only
async def test_workers_in_parallel_share_the_queue_and_take_over_a_dead_workers_job(db_url: str) -> None:
    engine = create_engine(db_url)
    maker = create_sessionmaker(engine)
    try:
        # A worker claimed this job and died (never renews): lease 0.3 s.
        dead_id = await _enqueue(maker, "test.echo", {"dead": True})
        assert await workqueue.claim(maker, lease_seconds=0.3) is not None
        ids = [await _enqueue(maker, "test.echo", {"n": n}) for n in range(20)]
        stop = asyncio.Event()
        settings = _settings(db_url, worker_poll_interval_seconds=0.1)
        runners = [
            asyncio.create_task(workqueue.run_worker(maker, settings, name=f"w{i}", stop=stop))
            for i in range(3)
        ]
        try:
            for _ in range(200):
                states = [(await _job(maker, j)).status for j in [dead_id, *ids]]
                if all(s == WorkStatus.FINISHED for s in states):
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            workers = await asyncio.gather(*runners)
        assert all(s == WorkStatus.FINISHED for s in states)
        assert (await _job(maker, dead_id)).attempts == 2
        # Every run by these workers is one claim of a job: 21 when no lease ran out, one more for a
        # job whose lease expired under load and was taken over (its first run's outcome fenced off).
        attempts = [(await _job(maker, j)).attempts for j in [dead_id, *ids]]
        assert sum(w.jobs_done for w in workers) == sum(attempts) - 1  # the dead worker's claim
        assert sum(attempts) - 1 >= 21
    finally:
        await engine.dispose()
