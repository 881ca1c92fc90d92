"""Login throttling (issue 14, item 5): failed password logins are limited per login name and per
client address (429 with Retry-After, the right password included until the window ends), argon2
runs in a bounded pool, and failed logins become one audit row per name, address and window."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from flplatform.app import create_app
from flplatform.auth.credentials import _HashingPool
from flplatform.auth.throttle_storage import DatabaseStorage
from flplatform.errors import TooManyRequests
from flplatform.orm.audit import AuditLog
from flplatform.settings import Settings

PER_ACCOUNT = 3
PER_ADDRESS = 5
WINDOW = 4  # long enough for a loaded machine to make its attempts within one window


def throttled_app(db_url: str, storage: str, window: int = WINDOW) -> Any:
    return create_app(
        Settings(
            database_url=db_url,
            login_max_failures_per_account=PER_ACCOUNT,
            login_max_failures_per_address=PER_ADDRESS,
            login_window_seconds=window,
            login_throttle_storage_uri=storage,
        )
    )


@pytest.fixture(params=["memory", "database"])
async def throttled(db_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    application = throttled_app(db_url, request.param)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(throttled: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=throttled), base_url="http://t") as client:
        yield client


def basic(login: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}


async def token_login(http: httpx.AsyncClient, login: str, password: str) -> httpx.Response:
    return await http.post("/api/auth/token/", data={"username": login, "password": password})


def assert_throttled(resp: httpx.Response) -> int:
    assert resp.status_code == 429, resp.text
    body = resp.json()
    assert body["code"] == "login_throttled" and body["detail"]
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= WINDOW
    return retry_after


async def test_account_locked_after_failures_right_password_too_until_window_ends(http, alice, bob):
    for _ in range(PER_ACCOUNT):
        assert (await token_login(http, "alice", "wrong-password")).status_code == 401
    assert_throttled(await token_login(http, "alice", "wrong-password"))
    retry_after = assert_throttled(await token_login(http, "alice", alice.password))
    # Every password path shares the count: Basic on any route, by user name or email.
    assert_throttled(await http.get("/api/users/myself/", headers=basic("alice", alice.password)))
    assert_throttled(await http.get("/api/users/myself/", headers=basic("ALICE ", alice.password)))
    # Another account is not affected, nor are alice's tokens.
    assert (await token_login(http, "bob", bob.password)).status_code == 200
    assert (await http.get("/api/users/myself/", headers=alice.headers)).status_code == 200

    await asyncio.sleep(retry_after + 0.2)
    resp = await token_login(http, "alice", alice.password)
    assert resp.status_code == 200, resp.text


async def test_address_limit_spans_user_names(http, bob):
    # Unknown names and known ones all count against the address.
    for i in range(PER_ADDRESS):
        name = f"nobody-{i}" if i % 2 else "bob"
        if name == "bob" and i >= PER_ACCOUNT:
            name = f"nobody-{i}"
        assert (await http.get("/api/users/myself/", headers=basic(name, "guess"))).status_code == 401
    assert_throttled(await token_login(http, "someone-else", "guess"))
    assert_throttled(await token_login(http, "bob", bob.password))


async def test_failed_logins_are_one_audit_row_per_name_address_and_window(http, throttled, alice):
    for _ in range(PER_ACCOUNT + 2):  # 3 failures, then 2 refused by the throttle
        await token_login(http, "alice", "wrong-password")
    for name in ("ghost-1", "ghost-2"):
        await token_login(http, name, "guess")
    async with throttled.state.sessionmaker() as session:
        assert (
            await session.execute(select(AuditLog).where(AuditLog.action == "auth.login_failed"))
        ).first() is None
    assert await throttled.state.login_guard.audit.flush(everything=True) == 2
    async with throttled.state.sessionmaker() as session:
        rows = (
            (
                await session.execute(
                    select(AuditLog).where(AuditLog.action == "auth.login_failed").order_by(AuditLog.count)
                )
            )
            .scalars()
            .all()
        )
    assert len(rows) == 2
    unknown, known = rows
    assert known.subject_user_id == alice.user.id and known.count == PER_ACCOUNT + 2
    assert "3 failed login(s) and 2 refused by throttling" in known.message
    assert known.ip == "127.0.0.1" and known.level.value == "WARNING"
    assert unknown.subject_user_id is None and unknown.count == 2
    assert "'ghost-1'" in unknown.message and "'ghost-2'" in unknown.message


async def test_default_app_has_generous_limits(client, alice):
    """The shared test application uses the defaults: a few typos never lock anyone out."""
    for _ in range(3):
        assert (await token_login(client, "alice", "typo")).status_code == 401
    assert (await token_login(client, "alice", alice.password)).status_code == 200


async def test_hashing_pool_bounds_threads_and_waiting_callers():
    pool = _HashingPool(threads=1, max_waiting=1)
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def work() -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1
        return 1

    first = asyncio.create_task(pool.run(work))
    second = asyncio.create_task(pool.run(work))
    await asyncio.sleep(0.05)
    with pytest.raises(TooManyRequests) as refused:
        await pool.run(work)
    assert refused.value.headers == {"Retry-After": "1"}
    release.set()
    assert await first + await second == 2
    assert most == 1
    assert pool.in_flight == 0
    pool.executor.shutdown()


async def test_database_counters_are_shared_by_workers(db_url, alice):
    """Two application processes on one database (two workers) share the counters."""
    first, second = throttled_app(db_url, "database", 60), throttled_app(db_url, "database", 60)
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        assert isinstance(first.state.login_guard.storage, DatabaseStorage)
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://a") as a,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://b") as b,
        ):
            for i in range(PER_ACCOUNT):
                assert (await token_login(a if i % 2 else b, "alice", "wrong")).status_code == 401
            for http in (a, b):
                resp = await token_login(http, "alice", alice.password)
                assert resp.status_code == 429 and 1 <= int(resp.headers["Retry-After"]) <= 60, resp.text


async def test_database_storage_windows_and_purge(app):
    storage = DatabaseStorage(app.state.engine)
    assert await storage.check()
    assert [await storage.incr("k", 1) for _ in range(3)] == [1, 2, 3]
    assert await storage.get("k") == 3 and await storage.get("other") == 0
    assert 0 < await storage.get_expiry("k") - time.time() <= 1
    assert await storage.incr("long", 60, amount=2) == 2
    await asyncio.sleep(1.1)
    assert await storage.get("k") == 0  # the window ended
    assert await storage.purge() == 1  # "k" only
    assert await storage.incr("k", 1) == 1  # a new window
    await storage.clear("long")
    assert await storage.get("long") == 0
    assert await storage.reset() == 1


async def test_postgresql_default_is_the_database(db_url, app):
    storage = app.state.login_guard.storage
    assert isinstance(storage, DatabaseStorage) == db_url.startswith("postgresql")
