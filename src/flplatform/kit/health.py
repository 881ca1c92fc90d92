"""The readiness probe's database check (``GET /ready``), kept out of the router so that routers
issue no SQL themselves."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


async def database_unreachable(engine: AsyncEngine) -> str | None:
    """None when the database answers ``SELECT 1``; otherwise the driver error's class name."""
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready"
        return type(exc).__name__
    return None
