"""Test harness: every database test runs on SQLite **and** PostgreSQL.

The session starts a throwaway PostgreSQL cluster with ``initdb``/``pg_ctl`` from PATH (as the
``postgres`` OS user when run as root), builds both schemas by running the Alembic
migrations, and empties every table after each test. Without PostgreSQL binaries the
PostgreSQL half is skipped with one line saying why, except under CI (``CI=true``), where that
is an error.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Cheap password hashing and a fixed secret, before anything reads the settings.
os.environ.setdefault("FLP_ARGON2_TIME_COST", "1")
os.environ.setdefault("FLP_ARGON2_MEMORY_COST_KIB", "64")
os.environ.setdefault("FLP_SECRET_KEY", "test-secret-key-not-for-production")
# Test clients' notification endpoints listen on loopback, which the SSRF guard refuses unless
# allowlisted (as a one-host install would); tests of the guard itself pass an empty list.
os.environ.setdefault("FLP_NOTIFICATION_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")
os.environ.pop("FLP_DATABASE_URL", None)
# Model bytes of every test database go to one throwaway blob directory (content-addressed, so
# databases can share it; no test sweeps it), never to ./blobs of the checkout.
os.environ.setdefault("FLP_BLOB_DIR", tempfile.mkdtemp(prefix="flp-test-blobs-"))

import httpx  # noqa: E402
import pytest  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession  # noqa: E402

from flplatform.app import create_app  # noqa: E402
from flplatform.broker.config import BrokerConfig  # noqa: E402
from flplatform.db import create_engine  # noqa: E402
from flplatform.jobs import install as install_jobs  # noqa: E402
from flplatform.migrate import upgrade  # noqa: E402
from flplatform.orm import Base, User  # noqa: E402
from flplatform.settings import Settings  # noqa: E402
from flplatform.users.schemas import UserCreate  # noqa: E402
from flplatform.users.service import create_user  # noqa: E402

BACKENDS = ("sqlite", "postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _jobs_installed() -> None:
    """Every job kind and hook, as ``flplatform serve`` and ``flplatform worker`` install them
    (tests that run handlers or rounds without an app get them too)."""
    install_jobs()


# --------------------------------------------------------------------------- PostgreSQL cluster


@dataclass
class PostgresCluster:
    datadir: Path
    port: int
    runas: list[str]

    @property
    def admin_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        async def _create() -> None:
            engine = create_engine(self.admin_url)
            async with engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
            await engine.dispose()

        asyncio.run(_create())
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            [*self.runas, "pg_ctl", "-D", str(self.datadir), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )


def _postgres_unavailable_reason() -> str | None:
    for binary in ("initdb", "pg_ctl"):
        if shutil.which(binary) is None:
            return f"PostgreSQL binaries not found on PATH ({binary} missing)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' OS user to run initdb as"
    return None


def start_postgres(base: Path) -> PostgresCluster:
    runas: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runas = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, user="postgres")
    datadir = base / "data"
    port = free_port()
    subprocess.run(
        [*runas, "initdb", "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300 -c shared_buffers=128MB"
    )
    subprocess.run(
        [
            *runas,
            "pg_ctl",
            "-D",
            str(datadir),
            "-o",
            options,
            "-l",
            str(base / "log"),
            "-w",
            "-t",
            "60",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    return PostgresCluster(datadir=datadir, port=port, runas=runas)


def _reap_orphan_clusters() -> None:
    """Stop the throwaway clusters of test sessions that were killed (SIGKILL, a CI timeout) before
    their teardown ran; otherwise each one keeps a postgres server running on the machine."""
    for owner_file in Path(tempfile.gettempdir()).glob("flp-pg-*/owner.pid"):
        try:
            os.kill(int(owner_file.read_text()), 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError, OSError):
            continue
        base = owner_file.parent
        runas = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*runas, "pg_ctl", "-D", str(base / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster | None]:
    reason = _postgres_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        print(f"\nPostgreSQL tests skipped: {reason}")
        yield None
        return
    _reap_orphan_clusters()
    base = Path(tempfile.mkdtemp(prefix="flp-pg-"))
    base.chmod(0o755)
    (base / "owner.pid").write_text(str(os.getpid()))
    cluster = start_postgres(base)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_urls(
    postgres_cluster: PostgresCluster | None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """One migrated database per backend for the whole session."""
    urls: dict[str, str] = {}
    sqlite_file = tmp_path_factory.mktemp("sqlite") / "test.db"
    urls["sqlite"] = f"sqlite+aiosqlite:///{sqlite_file}"
    if postgres_cluster is not None:
        urls["postgresql"] = postgres_cluster.create_database("flp_test")
    for url in urls.values():
        upgrade(url)
    return urls


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Locking and concurrency tests run on PostgreSQL only (SQLite has one writer and SQLAlchemy
    drops FOR UPDATE there): deselect their SQLite variants instead of skipping them."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (
            item.get_closest_marker("postgres_only")
            and callspec is not None
            and callspec.params.get("db_backend") == "sqlite"
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --------------------------------------------------------------------------- per-test database


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(db_backend: str, migrated_urls: dict[str, str]) -> Iterator[str]:
    if db_backend not in migrated_urls:
        pytest.skip("PostgreSQL not available")
    url = migrated_urls[db_backend]
    yield url
    asyncio.run(_empty_tables(url))


async def _empty_tables(url: str) -> None:
    engine = create_engine(url)
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with engine.begin() as conn:
        if url.startswith("postgresql"):
            existing = set(
                (
                    await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname='public'"))
                ).scalars()
            )
            names = ", ".join(f'"{t}"' for t in tables if t in existing)
            if names:
                await conn.execute(text(f"TRUNCATE {names} CASCADE"))
        else:
            for table in tables:
                await conn.execute(text(f'DELETE FROM "{table}"'))
    await engine.dispose()


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url)


# One application object per distinct Settings for the whole session: FastAPI builds each
# route's request/response machinery lazily per application (tens of ms per route), which
# dominated short tests when every test built a new one. Each test still gets its own
# lifespan (engine, background components), and app.state is put back afterwards.
_APPS: dict[str, Any] = {}


def _settings_key(settings: Settings) -> str:
    return repr(
        sorted(
            (name, repr(getattr(value, "get_secret_value", lambda v=value: v)())) for name, value in settings
        )
    )


@pytest.fixture
async def app(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    key = _settings_key(settings)
    application = _APPS.get(key)
    if application is None:
        application = _APPS[key] = create_app(settings)
    initial_state = dict(application.state._state)
    # This test's own Settings object (equal values): a test that changes a field on
    # app.state.settings must not change it for the later tests that share this app.
    application.state.settings = settings
    broker_config = request.node.get_closest_marker("broker_config")
    if broker_config is not None:  # read by the broker at start-up; put back with the state below
        application.state.broker_config = BrokerConfig(**broker_config.kwargs)
    try:
        async with application.router.lifespan_context(application):
            yield application
    finally:
        application.state._state.clear()
        application.state._state.update(initial_state)


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
async def session(app: Any) -> AsyncIterator[AsyncSession]:
    async with app.state.sessionmaker() as db_session:
        yield db_session


# --------------------------------------------------------------------------- factories


@dataclass
class Account:
    user: User
    token: str
    password: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    @property
    def id(self) -> str:
        return str(self.user.id)


@pytest.fixture
def make_user(app: Any):  # type: ignore[no-untyped-def]
    """Factory: ``await make_user("alice", superuser=True, **fields)`` → Account (committed)."""

    async def _make(
        username: str, *, superuser: bool = False, password: str = "password-123", **fields: Any
    ) -> Account:
        data = UserCreate(
            username=username,
            password=password,
            email=fields.pop("email", f"{username}@example.org"),
            is_superuser=superuser,
            is_staff=superuser,
            **fields,
        )
        async with app.state.sessionmaker() as db_session:
            root = User(username="<tests>", is_superuser=True)
            user, token = await create_user(db_session, data, created_by=root)
            await db_session.commit()
        return Account(user=user, token=token, password=password)

    return _make


@pytest.fixture
async def admin(make_user: Any) -> Account:
    return await make_user("admin", superuser=True)


@pytest.fixture
async def alice(make_user: Any) -> Account:
    return await make_user("alice", actor=True)


@pytest.fixture
async def bob(make_user: Any) -> Account:
    return await make_user("bob", client=True)


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")
