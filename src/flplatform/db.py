"""Async engine, one session per request, and after-commit hooks.

Services never commit. The request dependency (``get_session``) commits once when the
endpoint returns and rolls back on error; work registered with ``after_commit`` runs only
once the commit succeeded, so a rolled-back request never notifies or aggregates.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.util import EMPTY_DICT

from flplatform.kit.tasks import spawn
from flplatform.settings import Settings

log = logging.getLogger(__name__)

AfterCommit = Callable[[], Coroutine[Any, Any, Any]]


def _enable_sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL lets readers proceed while one writer writes; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


#: Seconds SQLAlchemy may spend closing a terminated aiosqlite connection gracefully (see below).
AIOSQLITE_CLOSE_SECONDS = 2.0


def _bound_aiosqlite_graceful_close() -> None:
    """Give up a graceful aiosqlite close after a while (SQLAlchemy then force-closes it).

    SQLAlchemy terminates a connection whose task is cancelled mid-operation with a shielded graceful
    ``close()`` and, when the cancellation reaches it, a forced ``stop()`` of aiosqlite's thread.
    aiosqlite 0.22's ``close()`` then waits for that exited thread for good (omnilib/aiosqlite#369),
    and asyncio's shutdown waits for that task: a test session hung in teardown, and ``serve`` would
    hang on SIGTERM. The forced stop has already closed the sqlite connection, so nothing is lost
    by no longer waiting. (Pinning aiosqlite 0.21 instead leaves such connections open, holding
    SQLite's write lock: "database is locked" in other tests.)
    """
    try:
        from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection as adapter
    except ImportError:  # aiosqlite not installed
        return
    graceful = getattr(adapter, "_terminate_graceful_close", None)
    if graceful is None or getattr(graceful, "bounded", False):
        return

    async def bounded_graceful_close(self: Any) -> None:
        await asyncio.wait_for(graceful(self), timeout=AIOSQLITE_CLOSE_SECONDS)

    bounded_graceful_close.bounded = True  # type: ignore[attr-defined]
    # A deliberate patch of SQLAlchemy's adapter class (see above); mypy rightly flags assigning a method.
    adapter._terminate_graceful_close = bounded_graceful_close  # type: ignore[method-assign]


def _run_sqlite_statement(
    connection: Any, operation: Any, parameters: Any, many: bool
) -> tuple[Any, int, Any, list[Any]]:
    """In aiosqlite's thread: one statement from cursor to fetched rows (see `_OneHandOffCursor`)."""
    cursor = connection.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


def _one_hand_off_cursors() -> None:
    """Make each SQLite statement one trip to aiosqlite's thread instead of four.

    SQLAlchemy's aiosqlite adapter opens a cursor, executes, fetches and closes it as four queued
    calls, each a thread wake-up and an event-loop wake-up: ~450 us of CPU per statement against
    ~50 us for the same statement through synchronous SQLAlchemy, and most of a small upload's
    server CPU. The replacement cursor runs the four steps in one call on aiosqlite's thread (the
    same sqlite3 connection, statements and transaction) and keeps description, rowcount,
    lastrowid and the rows, which is all SQLAlchemy reads from a client-side cursor.
    """
    try:
        from sqlalchemy.dialects.sqlite import aiosqlite as dialect
    except ImportError:  # aiosqlite not installed
        return
    adapter = dialect.AsyncAdapt_aiosqlite_connection
    if getattr(adapter._cursor_cls, "one_hand_off", False):
        return

    class OneHandOffCursor(dialect.AsyncAdapt_aiosqlite_cursor):
        __slots__ = ("_description", "_rowcount", "_lastrowid", "_arraysize")
        one_hand_off = True

        def __init__(self, adapt_connection: Any) -> None:
            # No cursor is opened here: the statement's single call opens and closes its own.
            self._adapt_connection = adapt_connection
            self._connection = adapt_connection._connection
            self._soft_closed_memoized = EMPTY_DICT
            self._rows = collections.deque()
            self._description: Any = None
            self._rowcount = -1
            self._lastrowid: Any = None
            self._arraysize = 1

        @property
        def description(self) -> Any:
            return self._description

        @property
        def rowcount(self) -> int:
            return self._rowcount

        @property
        def lastrowid(self) -> Any:
            return self._lastrowid

        @property
        def arraysize(self) -> int:
            return self._arraysize

        @arraysize.setter
        def arraysize(self, value: int) -> None:
            self._arraysize = value

        async def _async_soft_close(self) -> None:
            return None

        def close(self) -> None:
            self._rows.clear()

        def setinputsizes(self, *inputsizes: Any) -> None:
            return None

        async def _run(self, operation: Any, parameters: Any, many: bool) -> None:
            async with self._adapt_connection._execute_mutex:
                connection = self._connection
                outcome = await connection._execute(
                    _run_sqlite_statement, connection._conn, operation, parameters, many
                )
            self._description, self._rowcount, self._lastrowid, rows = outcome
            self._rows = collections.deque(rows)

        async def _execute_async(self, operation: Any, parameters: Any) -> Any:
            await self._run(operation, parameters, False)

        async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
            await self._run(operation, seq_of_parameters, True)

    adapter._cursor_cls = OneHandOffCursor


#: A pooled PostgreSQL connection idle at least this long is pinged before it is handed out.
POOL_PING_AFTER_IDLE_SECONDS = 10.0


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """Ping a pooled connection before use only when it sat idle: a connection the server or the
    network dropped (a restart, an idle timeout) is replaced before any statement fails on it.
    SQLAlchemy's ``pool_pre_ping`` pings on every checkout, a round trip each: 0.5-0.8 ms of
    server CPU per client update (docs/performance.md), on connections a busy server used
    milliseconds ago. A connection that dies mid-use is still caught by SQLAlchemy's disconnect
    detection, which empties the pool."""
    dialect = engine.sync_engine.dialect

    def stamp_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    def ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in = record.info.pop("checked_in_at", None)
        if checked_in is None or time.monotonic() - checked_in < POOL_PING_AFTER_IDLE_SECONDS:
            return  # a new connection, or one in use moments ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as error:  # the pool discards it and checks out another (up to 3 tries)
            raise exc.DisconnectionError(f"an idle pooled connection was dropped: {error}") from error

    event.listen(engine.sync_engine, "checkin", stamp_checkin)
    event.listen(engine.sync_engine, "checkout", ping_if_idle)


def create_engine(settings: Settings | str) -> AsyncEngine:
    url = settings if isinstance(settings, str) else settings.database_url
    kwargs: dict[str, Any] = {}
    if url.startswith("postgresql"):
        pool_size = 10 if isinstance(settings, str) else settings.db_pool_size
        overflow = 20 if isinstance(settings, str) else settings.db_max_overflow
        # LIFO: the connection returned last is handed out next, so sequential requests keep to
        # a few hot connections (each prepares a statement once: asyncpg's per-connection cache)
        # and the rest sit idle, pinged before their next use (_ping_idle_connections)
        kwargs.update(pool_size=pool_size, max_overflow=overflow, pool_use_lifo=True)
    engine = create_async_engine(url, **kwargs)
    if url.startswith("postgresql"):
        _ping_idle_connections(engine)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _enable_sqlite_foreign_keys)
        _bound_aiosqlite_graceful_close()
        _one_hand_off_cursors()
    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=True)


def after_commit(session: AsyncSession, job: AfterCommit) -> None:
    """Run ``job`` in the background once the session's transaction has committed."""
    session.info.setdefault("after_commit", []).append(job)


def _take_after_commit(session: AsyncSession) -> list[AfterCommit]:
    return session.info.pop("after_commit", [])


async def commit_and_dispatch(session: AsyncSession) -> None:
    """Commit, then start the after-commit jobs (jobs are dropped if the commit fails)."""
    try:
        await session.commit()
    except BaseException:
        _take_after_commit(session)
        raise
    for job in _take_after_commit(session):
        spawn(job(), name=getattr(job, "__name__", "after-commit"))


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with maker() as session:
        try:
            yield session
            await commit_and_dispatch(session)
        except BaseException:
            _take_after_commit(session)
            await session.rollback()
            raise


# scope="function": commit before the response is sent, so a client that got 201 can read its write.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
