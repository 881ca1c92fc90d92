"""The worker: registers itself as a ``Server`` row, claims jobs, runs their handlers, keeps
their leases alive, records the outcome; a heartbeat keeps ``Server.last_seen_at`` fresh.

Idle workers sleep until woken: by a local enqueue (after its transaction committed), by
PostgreSQL ``NOTIFY flp_work`` (sent by every enqueue, so workers on other hosts wake too), or
by the poll interval, which also finds jobs whose lease expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.kit import metrics
from flplatform.orm.base import utcnow
from flplatform.orm.workqueue import Server
from flplatform.settings import Settings
from flplatform.workqueue import queue
from flplatform.workqueue.records import CompletedWorkLog
from flplatform.workqueue.registry import JobContext, lookup
from flplatform.workqueue.servers import register_server

log = logging.getLogger(__name__)


def gpu_memory() -> list[int]:
    """Total memory (bytes) of each visible CUDA device; empty without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    if not torch.cuda.is_available():
        return []
    return [int(torch.cuda.get_device_properties(i).total_memory) for i in range(torch.cuda.device_count())]


def heartbeat_interval(lease_seconds: float) -> float:
    """How often a worker refreshes ``Server.last_seen_at``."""
    return max(min(10.0, lease_seconds / 3), 0.05)


async def live_workers(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> int:
    """Workers (in-process or ``flplatform worker``) whose heartbeat is recent: ready and seen
    within three heartbeat intervals plus a few seconds."""
    since = utcnow() - dt.timedelta(seconds=3 * heartbeat_interval(settings.work_lease_seconds) + 5)
    async with sessionmaker() as session:
        stmt = (
            select(func.count())
            .select_from(Server)
            .where(Server.ready.is_(True), Server.last_seen_at >= since)
        )
        return int((await session.execute(stmt)).scalar_one())


async def _warn_without_worker(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    """``FLP_INPROCESS_WORKER=false``: queued jobs need a worker elsewhere; say so at start-up,
    loudly when no worker's heartbeat is recent."""
    what = (
        "this server process runs no work-queue worker (FLP_INPROCESS_WORKER=false): queued jobs "
        "(round aggregation, inference jobs) run only in a `flplatform worker` (or a server with the "
        "in-process worker) on this database"
    )
    try:
        seen = await live_workers(sessionmaker, settings)
    except Exception:
        log.warning("%s; whether one runs could not be checked", what, exc_info=True)
        return
    if seen:
        log.info("%s; %d worker(s) with a recent heartbeat", what, seen)
    else:
        log.warning(
            "%s, and none has a recent heartbeat: start `flplatform worker`, or trainings stop at their "
            "first aggregation and inference jobs stay waiting",
            what,
        )


def default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """One worker (``concurrency`` jobs at a time). ``run()`` until ``stop()``."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        settings: Settings,
        *,
        name: str | None = None,
        app: FastAPI | None = None,
        concurrency: int | None = None,
        kinds: list[str] | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.name = name or default_name()
        self.app = app
        self.concurrency = concurrency or settings.worker_concurrency
        self.kinds = kinds
        self.server_id: uuid.UUID | None = None
        self.shared: dict[str, Any] = {}
        self.jobs_done = 0
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._listener: Any = None

    # ------------------------------------------------------------------ control

    def kick(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    @property
    def lease_seconds(self) -> float:
        return self.settings.work_lease_seconds

    async def run(self, *, grace_seconds: float = 5.0) -> None:
        queue.LOCAL_WORKERS.add(self)
        await self._register(ready=True)
        await self._listen()
        heartbeat = asyncio.get_running_loop().create_task(
            self._heartbeat(), name=f"worker-heartbeat-{self.name}"
        )
        try:
            await self._loop()
        finally:
            queue.LOCAL_WORKERS.discard(self)
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self._drain(grace_seconds)
            await self._unlisten()
            with contextlib.suppress(Exception):
                await self._register(ready=False)

    async def run_once(self) -> bool:
        """Claim and run one job in the foreground (tests, scripts); False when none was due."""
        job = await queue.claim(
            self.sessionmaker, lease_seconds=self.lease_seconds, server_id=self.server_id, kinds=self.kinds
        )
        if job is None:
            return False
        await self._execute(job)
        return True

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        poll = self.settings.worker_poll_interval_seconds
        while not self._stopping.is_set():
            self._wake.clear()
            while len(self._running) < self.concurrency and not self._stopping.is_set():
                try:
                    job = await queue.claim(
                        self.sessionmaker,
                        lease_seconds=self.lease_seconds,
                        server_id=self.server_id,
                        kinds=self.kinds,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("worker %s: claiming failed; retrying after the poll interval", self.name)
                    break
                if job is None:
                    break
                task = asyncio.get_running_loop().create_task(
                    self._execute(job), name=f"job-{job.kind}-{job.id}"
                )
                self._running.add(task)
                task.add_done_callback(self._job_done)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=poll)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self.jobs_done += 1
        self._wake.set()  # a slot is free

    async def _execute(self, job: queue.ClaimedJob) -> None:
        registration = lookup(job.kind)
        if registration is None:
            await queue.fail(
                self.sessionmaker, job, f"no handler registered for job kind {job.kind!r} on {self.name}"
            )
            return
        context = JobContext(
            sessionmaker=self.sessionmaker,
            settings=self.settings,
            job_id=job.id,
            attempt=job.attempt,
            app=self.app,
            shared=self.shared,
        )
        work: asyncio.Task[dict[str, Any] | None] = asyncio.get_running_loop().create_task(
            registration.handler(context, job.payload)
        )
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(job, work))
        elapsed = metrics.stopwatch()
        try:
            result = await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Shutdown: hand the job back so another worker starts it at once.
                with contextlib.suppress(Exception):
                    await asyncio.shield(queue.release(self.sessionmaker, job))
                raise
            log.warning("job %s (%s): claim lost while running; its result is dropped", job.id, job.kind)
            metrics.observe_job_run(job.kind, "lost", elapsed())
            return
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.kind)
            metrics.observe_job_run(job.kind, "error", elapsed())
            await queue.fail(self.sessionmaker, job, exc)
            return
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        metrics.observe_job_run(job.kind, "finished", elapsed())
        if not await queue.finish(self.sessionmaker, job, result if isinstance(result, dict) else None):
            log.warning(
                "job %s (%s): finished after its claim was taken over; outcome not recorded", job.id, job.kind
            )

    async def _keep_lease(self, job: queue.ClaimedJob, work: asyncio.Task[Any]) -> None:
        interval = max(self.lease_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                still_ours = await queue.renew(self.sessionmaker, job, self.lease_seconds)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s: renewing the lease failed; trying again", job.id)
                continue
            if not still_ours:
                work.cancel()
                return

    async def _drain(self, grace_seconds: float) -> None:
        if not self._running:
            return
        _, pending = await asyncio.wait(set(self._running), timeout=grace_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------ server row, heartbeat, NOTIFY

    async def _register(self, *, ready: bool) -> None:
        async with self.sessionmaker() as session:
            server = await register_server(session, self.name, ready=ready, gpu_memory=gpu_memory())
            await session.commit()
            self.server_id = server.id

    async def _heartbeat(self) -> None:
        interval = heartbeat_interval(self.lease_seconds)
        while True:
            await asyncio.sleep(interval)
            try:
                async with self.sessionmaker() as session:
                    await session.execute(
                        update(Server)
                        .where(Server.id == self.server_id)
                        .values(last_seen_at=utcnow(), ready=True)
                    )
                    await session.commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker %s: heartbeat failed", self.name)

    async def _listen(self) -> None:
        url = self.settings.database_url
        if not url.startswith("postgresql"):
            return
        try:
            import asyncpg

            self._listener = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
            await self._listener.add_listener(queue.NOTIFY_CHANNEL, lambda *_: self._wake.set())
        except Exception:
            log.warning(
                "worker %s: LISTEN %s unavailable; polling only",
                self.name,
                queue.NOTIFY_CHANNEL,
                exc_info=True,
            )
            self._listener = None

    async def _unlisten(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None


async def run_worker(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    name: str | None = None,
    app: FastAPI | None = None,
    concurrency: int | None = None,
    kinds: list[str] | None = None,
    stop: asyncio.Event | None = None,
) -> Worker:
    """Run a worker until ``stop`` is set (or the task is cancelled); returns it when done."""
    worker = Worker(sessionmaker, settings, name=name, app=app, concurrency=concurrency, kinds=kinds)
    runner = asyncio.get_running_loop().create_task(worker.run(), name=f"worker-{worker.name}")
    try:
        if stop is None:
            await runner
        else:
            await stop.wait()
            worker.stop()
            await runner
    finally:
        if not runner.done():
            worker.stop()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
    return worker


@contextlib.asynccontextmanager
async def workqueue_component(app: FastAPI) -> AsyncIterator[Worker | None]:
    """Lifespan component: one in-process worker per server process (``FLP_INPROCESS_WORKER``),
    and the batched log of jobs run inside requests (``app.state.work_log``)."""
    work_log = CompletedWorkLog(app.state.sessionmaker)
    app.state.work_log = work_log
    writer = asyncio.get_running_loop().create_task(work_log.run(), name="completed-work-log")
    try:
        async with _inprocess_worker(app) as worker:
            yield worker
    finally:
        writer.cancel()  # run() writes what is left before it ends
        await asyncio.gather(writer, return_exceptions=True)


@contextlib.asynccontextmanager
async def _inprocess_worker(app: FastAPI) -> AsyncIterator[Worker | None]:
    settings: Settings = app.state.settings
    if not settings.inprocess_worker:
        app.state.work_worker = None
        await _warn_without_worker(app.state.sessionmaker, settings)
        yield None
        return
    worker = Worker(app.state.sessionmaker, settings, app=app)
    app.state.work_worker = worker
    runner = asyncio.get_running_loop().create_task(worker.run(), name=f"worker-{worker.name}")
    try:
        yield worker
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(asyncio.shield(runner), timeout=10)
        except (TimeoutError, asyncio.CancelledError):
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
