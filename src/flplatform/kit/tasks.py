"""Background tasks of this process: strong references, logged failures, cancellation at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)
_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %s failed", task.get_name(), exc_info=exc)


async def drain(timeout: float = 10.0) -> None:
    """Wait for running background tasks (tests and graceful shutdown), then cancel stragglers."""
    loop = asyncio.get_running_loop()
    pending = {t for t in _running if t.get_loop() is loop}
    if pending:
        done, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            task.cancel()
        if still:
            await asyncio.gather(*still, return_exceptions=True)


async def cancel_all() -> None:
    loop = asyncio.get_running_loop()
    pending = [t for t in _running if t.get_loop() is loop]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
