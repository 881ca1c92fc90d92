"""Job kinds and their handlers (process-wide). A domain's ``jobs.py`` offers a ``register()``
that ``flplatform.jobs.install()`` calls in every entry point (never at import time)::

    async def aggregate_round(ctx: JobContext, payload: dict) -> dict | None: ...

    def register() -> None:
        workqueue.register("aggregate_round", aggregate_round, category=WorkKind.AGGREGATION)

A handler must be idempotent: a job whose worker died is run again by another worker after
its lease expired (at-least-once execution; exactly-once effects are the handler's business,
e.g. a row lock and a fencing check before it commits its result).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.orm.workqueue import WorkKind
from flplatform.settings import Settings


@dataclass
class JobContext:
    """What a handler gets besides its payload."""

    sessionmaker: async_sessionmaker[AsyncSession]
    settings: Settings
    job_id: uuid.UUID
    attempt: int
    app: Any = None  # the FastAPI app when the worker runs inside a server process, else None
    shared: dict[str, Any] = field(default_factory=dict)  # per-worker objects handlers may cache


Handler = Callable[[JobContext, dict[str, Any]], Coroutine[Any, Any, dict[str, Any] | None]]


@dataclass(frozen=True)
class Registration:
    handler: Handler
    category: WorkKind
    #: False: the payload is emptied when the job ends (done or error) — inputs only a run needs,
    #: which would otherwise stay in the table for good (an inference job's uploaded batch).
    keep_payload: bool = True


_REGISTRY: dict[str, Registration] = {}


def register(
    kind: str, handler: Handler, *, category: WorkKind = WorkKind.AGGREGATION, keep_payload: bool = True
) -> None:
    """Register (or replace) the handler of a job kind."""
    if not kind or len(kind) > 100:
        raise ValueError("a job kind needs 1 to 100 characters")
    _REGISTRY[kind] = Registration(handler=handler, category=category, keep_payload=keep_payload)


def handler(
    kind: str, *, category: WorkKind = WorkKind.AGGREGATION, keep_payload: bool = True
) -> Callable[[Handler], Handler]:
    """Decorator form of :func:`register`."""

    def _decorate(func: Handler) -> Handler:
        register(kind, func, category=category, keep_payload=keep_payload)
        return func

    return _decorate


def lookup(kind: str) -> Registration | None:
    return _REGISTRY.get(kind)


def category_of(kind: str) -> WorkKind:
    registration = _REGISTRY.get(kind)
    if registration is None:
        raise ValueError(f"unknown job kind {kind!r}: register a handler for it first")
    return registration.category


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)
