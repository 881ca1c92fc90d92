"""Records of jobs a process ran itself while serving a request (inference), written in batches.

An inference is a ``Work`` row of category inference, claimed (attempt 1) and finished by the
process that served it — never queued for another one (the caller waits on that HTTP
connection, and the loaded module sits in that process's cache). Writing the row inside the
request would turn a read-only request into a write transaction and add a commit (a WAL flush)
to every response: measured +3 ms on a small model. Buffered here instead and written every
``interval`` seconds with two multi-row INSERTs, the record costs the request an ``append``.
A crash loses at most the last interval's records (the ledger, which bills the inference, is
written in the request's own transaction and is the authoritative account).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.orm.model import Model
from flplatform.orm.workqueue import Server, WorkKind, WorkStatus
from flplatform.workqueue.tables import QUEUED_WORK, WORK

log = logging.getLogger(__name__)


class CompletedWorkLog:
    """``add()`` from request handlers; ``run()`` in the background writes the rows."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], *, interval: float = 1.0, max_batch: int = 1000
    ) -> None:
        self.sessionmaker = sessionmaker
        self.interval = interval
        self.max_batch = max_batch
        self.written = 0
        self._rows: list[dict[str, Any]] = []
        self._wake = asyncio.Event()

    def add(
        self,
        kind: str,
        *,
        category: WorkKind,
        started_at: dt.datetime,
        finished_at: dt.datetime,
        server_id: uuid.UUID | None = None,
        model_id: uuid.UUID | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        self._rows.append(
            {
                "id": uuid.uuid4(),
                "kind": category,
                "handler": kind,
                "started_at": started_at,
                "finished_at": finished_at,
                "server_id": server_id,
                "model_id": model_id,
                "result": result,
            }
        )
        if len(self._rows) >= self.max_batch:
            self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
                self._wake.clear()
                try:
                    await self.flush()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception(
                        "writing %d completed-work records failed; they are dropped", len(self._rows)
                    )
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def flush(self) -> int:
        rows, self._rows = self._rows, []
        if not rows:
            return 0
        async with self.sessionmaker() as session:
            try:
                await self._insert(session, rows)
                await session.commit()
            except IntegrityError:  # a model (or a server row) was deleted meanwhile: keep the others
                await session.rollback()
                models = {r["model_id"] for r in rows if r["model_id"] is not None}
                servers = {r["server_id"] for r in rows if r["server_id"] is not None}
                alive = set((await session.execute(select(Model.id).where(Model.id.in_(models)))).scalars())
                alive |= set(
                    (await session.execute(select(Server.id).where(Server.id.in_(servers)))).scalars()
                )
                rows = [r for r in rows if r["model_id"] is None or r["model_id"] in alive]
                for row in rows:
                    if row["server_id"] not in alive:
                        row["server_id"] = None
                if rows:
                    await self._insert(session, rows)
                    await session.commit()
        self.written += len(rows)
        return len(rows)

    @staticmethod
    async def _insert(session: AsyncSession, rows: list[dict[str, Any]]) -> None:
        await session.execute(
            insert(WORK),
            [
                {
                    "id": r["id"],
                    "kind": r["kind"],
                    "status": WorkStatus.FINISHED,
                    "model_id": r["model_id"],
                    "server_id": r["server_id"],
                    "created_at": r["started_at"],
                    "started_at": r["started_at"],
                    "finished_at": r["finished_at"],
                }
                for r in rows
            ],
        )
        await session.execute(
            insert(QUEUED_WORK),
            [
                {
                    "id": r["id"],
                    "handler": r["handler"],
                    "payload": {},
                    "attempts": 1,
                    "max_attempts": 1,
                    "result": r["result"],
                }
                for r in rows
            ],
        )
