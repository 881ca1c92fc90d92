"""The sweep: deletes blobs that no row references once they are older than the grace period
(``FLP_BLOB_GC_GRACE_SECONDS``), and temporary files of writers that died.

Blobs are written before the row that names them is committed, so a young unreferenced blob may
belong to an upload in flight: the grace period protects it. Writing a blob that exists already
refreshes its time, so re-using an old unreferenced blob restarts its grace period too. Order
matters: the store is listed first and the references read after, then each candidate's time is
read once more just before it is deleted. Several processes may sweep at once (deleting is
idempotent). Each server process sweeps every ``FLP_BLOB_SWEEP_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, cast, select, union
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.blobs.base import BlobNotFound, BlobStore
from flplatform.blobs.config import BLOB_DIGESTS_KEY, SESSION_KEY, open_store
from flplatform.blobs.filesystem import FileBlobStore
from flplatform.orm import (
    GlobalModel,
    GlobalModelRound,
    Model,
    QueuedWork,
    SWAGModel,
    SwagStatistic,
    Training,
)

log = logging.getLogger(__name__)

# Every column that names a blob. A new one must be added here, or the sweep deletes its blobs.
DIGEST_COLUMNS = (
    Model.weights_digest,
    GlobalModel.preprocessing_digest,
    SWAGModel.swag_first_digest,
    SWAGModel.swag_second_digest,
    GlobalModelRound.weights_digest,
    Training.aggregator_state_digest,
    SwagStatistic.first_moment_digest,
    SwagStatistic.second_moment_digest,
)


@dataclass
class SweepReport:
    deleted: int = 0
    kept_young: int = 0
    referenced: int = 0
    stale_spool_files: int = 0


async def referenced_digests(session: AsyncSession) -> set[str]:
    """Digests named by a row's digest column, or by a queued job's payload (key ``blob_digests``:
    an inference job's uploaded input, until the job has run and its payload is cleared)."""
    query = union(*(select(column.label("digest")).where(column.isnot(None)) for column in DIGEST_COLUMNS))
    found = {digest for digest in (await session.execute(query)).scalars() if digest is not None}
    payloads = await session.execute(
        select(QueuedWork.payload).where(cast(QueuedWork.payload, String).contains(f'"{BLOB_DIGESTS_KEY}"'))
    )
    for payload in payloads.scalars():
        if isinstance(payload, dict):
            found.update(str(d) for d in payload.get(BLOB_DIGESTS_KEY) or ())
    return found


async def sweep(session: AsyncSession, store: BlobStore, grace_seconds: float) -> SweepReport:
    report = SweepReport()
    cutoff = time.time() - grace_seconds
    candidates = []
    async for blob in store.list():
        if blob.modified < cutoff:
            candidates.append(blob.digest)
        else:
            report.kept_young += 1
    if candidates:
        in_use = await referenced_digests(session)
        await session.rollback()  # end the read transaction; nothing is written
        for digest in candidates:
            if digest in in_use:
                report.referenced += 1
                continue
            try:
                if await store.modified(digest) >= cutoff:  # written again since it was listed
                    report.kept_young += 1
                    continue
            except BlobNotFound:
                continue
            await store.delete(digest)
            report.deleted += 1
    if isinstance(store, FileBlobStore):
        report.stale_spool_files = await store.remove_stale_spool()
    return report


@contextlib.asynccontextmanager
async def blob_sweeper_component(app: Any) -> AsyncIterator[None]:
    """Lifespan component: sweeps this process's store every ``blob_sweep_interval_seconds``."""
    settings = app.state.settings
    store = open_store(settings)

    async def loop() -> None:
        while True:
            await asyncio.sleep(settings.blob_sweep_interval_seconds)
            try:
                async with app.state.sessionmaker() as session:
                    session.info[SESSION_KEY] = store
                    report = await sweep(session, store, settings.blob_gc_grace_seconds)
                if report.deleted or report.stale_spool_files:
                    log.info("blob sweep of %s: %s", store.location, report)
            except Exception:  # a failed sweep is retried at the next interval
                log.exception("blob sweep of %s failed", store.location)

    task = asyncio.create_task(loop(), name="blob-sweeper")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
