"""Login throttling and the aggregated failed-login audit.

Every password check (OAuth2 ``/api/auth/token/``, HTTP Basic on any route, Basic on the broker's
websockets) goes through :meth:`LoginGuard.check` before argon2 runs and
:meth:`LoginGuard.failed` after a wrong password. Failures are counted with the ``limits``
library (fixed windows of ``FLP_LOGIN_WINDOW_SECONDS``) under two keys: the login name as typed
(case-folded; also for names that match no user, so probing costs the same) and the client
address. Once either count reaches its limit, password checks for that name, or from that
address, answer 429 with ``Retry-After`` — the right password too — until the window ends.

The counters live where ``FLP_LOGIN_THROTTLE_STORAGE_URI`` says: by default in the database on
PostgreSQL (a ``limits`` storage of our own, flplatform.auth.throttle_storage: every worker
shares them) and in memory on SQLite (one process); ``memory`` with several workers lets each count
on its own (up to N times the limits); any async ``limits`` storage URI (``async+redis://…``)
works too.

The audit log gets one ``auth.login_failed`` row per (login name, address) and window with the
number of failed and refused attempts (``count``), written when the window ends (or when
``_MAX_PENDING`` pairs are pending, or at shutdown). Names that match no user are grouped under
one row per address, so a password spray cannot create unbounded rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from limits import RateLimitItemPerSecond
from limits.aio.storage import Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string
from sqlalchemy.ext.asyncio import AsyncEngine

from flplatform.auth.credentials import configure_hashing
from flplatform.auth.throttle_storage import DatabaseStorage
from flplatform.errors import TooManyRequests
from flplatform.settings import Settings

log = logging.getLogger(__name__)

_MAX_PENDING = 10_000  # (name, address) pairs held before an early flush
_UNKNOWN = "<unknown user>"
_SAMPLE_NAMES = 5


@dataclass
class _PendingFailures:
    window_start: float
    user_id: uuid.UUID | None
    failed: int = 0
    refused: int = 0
    first_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    last_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    names: set[str] = field(default_factory=set)


class FailedLoginAudit:
    """Failed logins counted in memory and written as one audit row per (name, address, window)."""

    def __init__(self, sessionmaker: Any, window_seconds: float):
        self.sessionmaker = sessionmaker
        self.window = window_seconds
        self.pending: dict[tuple[str, str], _PendingFailures] = {}

    def add(self, login: str, address: str, user_id: uuid.UUID | None, *, refused: bool) -> None:
        name = login.strip().casefold()[:150] if user_id is not None else _UNKNOWN
        key = (name, address)
        now = time.monotonic()
        entry = self.pending.get(key)
        if entry is None:
            entry = self.pending[key] = _PendingFailures(window_start=now, user_id=user_id)
        entry.last_at = dt.datetime.now(dt.UTC)
        if refused:
            entry.refused += 1
        else:
            entry.failed += 1
        if user_id is None and len(entry.names) < _SAMPLE_NAMES:
            entry.names.add(login[:150])

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return len(self.pending) >= _MAX_PENDING or any(
            now - e.window_start >= self.window for e in self.pending.values()
        )

    async def flush(self, *, everything: bool = False) -> int:
        """Write the rows of windows that are over (all of them with ``everything``)."""
        now = time.monotonic()
        everything = everything or len(self.pending) >= _MAX_PENDING
        done = [k for k, e in self.pending.items() if everything or now - e.window_start >= self.window]
        if not done:
            return 0
        entries = [(k, self.pending.pop(k)) for k in done]
        try:
            await self._write(entries)
        except BaseException:
            for key, e in entries:  # put them back for the next flush
                later = self.pending.get(key)
                if later is not None:
                    e.failed, e.refused, e.last_at = (
                        e.failed + later.failed,
                        e.refused + later.refused,
                        later.last_at,
                    )
                    e.names |= later.names
                self.pending[key] = e
            raise
        return len(entries)

    async def _write(self, entries: list[tuple[tuple[str, str], _PendingFailures]]) -> None:
        from flplatform import audit

        async with self.sessionmaker() as session:
            for (name, address), e in entries:
                attempts = e.failed + e.refused
                what = f"{e.failed} failed login(s)"
                if e.refused:
                    what += f" and {e.refused} refused by throttling"
                sample = f" (names tried: {', '.join(repr(n) for n in sorted(e.names))})" if e.names else ""
                subject = repr(name) if e.user_id is not None else "user names that match no user"
                await audit.record(
                    session,
                    "auth.login_failed",
                    f"{what} for {subject} from {address} between {e.first_at:%Y-%m-%d %H:%M:%S} and "
                    f"{e.last_at:%Y-%m-%d %H:%M:%S} UTC{sample}",
                    level="WARNING",
                    subject_user_id=e.user_id,
                    ip=address[:64],
                    count=attempts,
                    module=__name__,
                    function="flush",
                )
            await session.commit()


class LoginGuard:
    """Per-name and per-address limits on failed password logins (one per application)."""

    def __init__(self, settings: Settings, sessionmaker: Any, engine: AsyncEngine | None = None):
        window = max(1, math.ceil(settings.login_window_seconds))
        self.window = window
        self.storage = throttle_storage(settings, engine)
        self.limiter = FixedWindowRateLimiter(self.storage)
        self.per_account = RateLimitItemPerSecond(settings.login_max_failures_per_account, window)
        self.per_address = RateLimitItemPerSecond(settings.login_max_failures_per_address, window)
        self.audit = FailedLoginAudit(sessionmaker, window)

    @staticmethod
    def _name(login: str) -> str:
        return login.strip().casefold()[:256]

    async def check(self, login: str, address: str | None, user_id: uuid.UUID | None = None) -> None:
        """Raise 429 when this name or this address has used up its failures for the window."""
        address = address or "unknown"
        for item, key in (
            (self.per_account, ("account", self._name(login))),
            (self.per_address, ("address", address)),
        ):
            if not await self.limiter.test(item, "login", *key):
                stats = await self.limiter.get_window_stats(item, "login", *key)
                self.audit.add(login, address, user_id, refused=True)
                raise TooManyRequests(
                    f"Too many failed logins for this {key[0]}; retry after the window ends.",
                    retry_after=math.ceil(stats.reset_time - time.time()),
                    code="login_throttled",
                )

    async def failed(self, login: str, address: str | None, user_id: uuid.UUID | None) -> None:
        address = address or "unknown"
        await self.limiter.hit(self.per_account, "login", "account", self._name(login))
        await self.limiter.hit(self.per_address, "login", "address", address)
        self.audit.add(login, address, user_id, refused=False)


def throttle_storage(settings: Settings, engine: AsyncEngine | None) -> Storage:
    uri = settings.login_throttle_storage_uri.strip()
    if uri == "auto":
        uri = "memory" if settings.is_sqlite or engine is None else "database"
    if uri == "database":
        if engine is None:
            raise RuntimeError(
                "FLP_LOGIN_THROTTLE_STORAGE_URI=database needs the application's database engine"
            )
        return DatabaseStorage(engine)
    if uri == "memory":
        uri = "async+memory://"
    storage = storage_from_string(uri)
    if not isinstance(storage, Storage):
        raise TypeError(f"FLP_LOGIN_THROTTLE_STORAGE_URI must name an async storage (async+…), not {uri!r}")
    return storage


def guard_of(app: Any) -> LoginGuard | None:
    return getattr(app.state, "login_guard", None)


@contextlib.asynccontextmanager
async def login_guard_component(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan component: a fresh guard per application run, its audit flushed as windows end."""
    settings: Settings = app.state.settings
    configure_hashing(settings.password_hash_concurrency, settings.password_hash_max_waiting)
    guard = LoginGuard(settings, app.state.sessionmaker, app.state.engine)
    app.state.login_guard = guard

    async def flush_loop() -> None:
        period = min(10.0, guard.window / 2)
        next_purge = 0.0
        while True:
            await asyncio.sleep(period)
            try:
                if guard.audit.due():
                    await guard.audit.flush()
                if isinstance(guard.storage, DatabaseStorage) and time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + guard.window
                    await guard.storage.purge()
            except Exception:  # kept or put back: the next round retries
                log.exception("writing failed-login audit rows or purging throttle counters failed")

    task = asyncio.create_task(flush_loop(), name="login-audit-flush")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await guard.audit.flush(everything=True)
        except Exception:
            log.exception("writing failed-login audit rows at shutdown failed")
