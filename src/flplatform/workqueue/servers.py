"""Worker processes as ``Server`` rows (seed ``Server``): a worker registers (or re-registers
under the same name) with its readiness and GPU memory; the heartbeat keeps ``last_seen_at``."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.orm.base import utcnow
from flplatform.orm.workqueue import Server


async def register_server(
    session: AsyncSession, name: str, *, ready: bool = True, gpu_memory: list[int] | None = None
) -> Server:
    server = (await session.execute(select(Server).where(Server.name == name))).scalar_one_or_none()
    if server is None:
        server = Server(name=name)
        session.add(server)
    server.ready, server.gpu_memory, server.last_seen_at = ready, gpu_memory or [], utcnow()
    await session.flush()
    return server
