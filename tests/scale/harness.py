"""Multi-process harness: real uvicorn worker processes on one PostgreSQL database.

Each worker is its own ``python -m uvicorn flplatform.app:create_app --factory`` subprocess on
its own port, so the test decides which process serves which request (``uvicorn --workers``
would share one port and let the kernel pick). ``kill -9`` is real: the processes get SIGKILL
with no chance to clean up, exactly like a crashed host.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save as safetensors_save

from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm import User
from flplatform.serving import uvicorn_ws_cli_args
from flplatform.users.schemas import UserCreate
from flplatform.users.service import create_user
from tests.conftest import free_port

ADMIN_PASSWORD = "admin-password-123"


def server_env(db_url: str, **overrides: str) -> dict[str, str]:
    """Environment of a worker process: the test database and secret, fast sweeps, cheap hashing."""
    env = dict(os.environ)
    env.update(
        FLP_DATABASE_URL=db_url,
        FLP_SECRET_KEY=os.environ["FLP_SECRET_KEY"],  # the test secret set by tests/conftest.py
        FLP_ARGON2_TIME_COST="1",
        FLP_ARGON2_MEMORY_COST_KIB="64",
        FLP_LOG_LEVEL="WARNING",
        FLP_TRAINING_SWEEP_INTERVAL_SECONDS="0.2",
        FLP_DB_POOL_SIZE="5",
        FLP_DB_MAX_OVERFLOW="10",
        FLP_FOLD_MAX_OPEN_ROUNDS="4",  # fold on arrival (the default, explicit): the multi-worker hand-offs
        FLP_FOLD_ON_ARRIVAL_MIN_BYTES="0",  # ... of these small models too (by default they fold at the close)
        PYTHONFAULTHANDLER="1",  # a worker that dies of a signal leaves its threads' tracebacks in its log
    )
    env.update(overrides)
    return env


@dataclass
class Fleet:
    """Worker processes started by one test; every one of them is killed when the test ends."""

    env: dict[str, str]
    logdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    _starts: int = 0

    def start(self, count: int, timeout: float = 60.0, **env: str) -> list[str]:
        """Start ``count`` workers on fresh ports (``env`` overrides this start's environment) and
        wait until each answers ``/health``."""
        started: list[tuple[subprocess.Popen[bytes], str]] = []
        for _ in range(count):
            port = free_port()
            self._starts += 1
            log = open(self.logdir / f"worker-{self._starts}-{port}.log", "wb")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "flplatform.app:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                    *uvicorn_ws_cli_args(),
                ],
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            self.procs.append(proc)
            started.append((proc, f"http://127.0.0.1:{port}"))
        deadline = time.monotonic() + timeout
        for proc, url in started:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {url} exited with {proc.returncode}:\n{self.logs()}")
                try:
                    if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {url} did not start:\n{self.logs()}")
                time.sleep(0.1)
        self.urls = [url for _, url in started]
        return self.urls

    def start_job_worker(self, **env: str) -> subprocess.Popen[bytes]:
        """Start ``flplatform worker`` (queue jobs only, no HTTP server) on the same database."""
        self._starts += 1
        log = open(self.logdir / f"job-worker-{self._starts}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "flplatform.cli", "worker", "--no-migrate"],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def ensure(self, count: int) -> list[str]:
        """The running workers' URLs, (re)starting them if a previous test killed them."""
        if (
            len(self.urls) != count
            or any(p.poll() is not None for p in self.procs[-count:])
            or len([p for p in self.procs if p.poll() is None]) != count
        ):
            self.kill9()
            self.start(count)
        return self.urls

    def kill9(self) -> None:
        """SIGKILL every running worker (a crash: no shutdown handlers, no flushing)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)
        self.urls = []

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.logdir.glob("*.log"))
        )


@contextmanager
def fleet(env: dict[str, str], logdir: Path) -> Iterator[Fleet]:
    workers = Fleet(env=env, logdir=logdir)
    try:
        yield workers
    finally:
        workers.stop()


# --------------------------------------------------------------------------- setup via HTTP


def create_admin(db_url: str) -> None:
    """The one account made straight in the database; everything else goes through the API."""

    async def _run() -> None:
        engine = create_engine(db_url)
        async with create_sessionmaker(engine)() as session:
            data = UserCreate(
                username="admin",
                password=ADMIN_PASSWORD,
                email="admin@example.org",
                is_superuser=True,
                is_staff=True,
            )
            await create_user(session, data, created_by=User(username="<tests>", is_superuser=True))
            await session.commit()
        await engine.dispose()

    asyncio.run(_run())


@dataclass
class Account:
    username: str
    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}


async def admin_headers(http: httpx.AsyncClient, url: str) -> dict[str, str]:
    r = await http.post(f"{url}/api/auth/token/", data={"username": "admin", "password": ADMIN_PASSWORD})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def create_account(
    http: httpx.AsyncClient, url: str, admin: dict[str, str], username: str, **fields: Any
) -> Account:
    body = {"username": username, "password": "password-123", "email": f"{username}@example.org", **fields}
    r = await http.post(f"{url}/api/users/", headers=admin, json=body)
    assert r.status_code == 201, r.text
    return Account(username=username, id=r.json()["id"], token=r.json()["token"])


# --------------------------------------------------------------------------- billing via HTTP


async def set_training_prices(
    http: httpx.AsyncClient,
    url: str,
    admin: dict[str, str],
    *,
    update: str,
    sample_epoch: str,
    reserve_samples: int,
) -> None:
    for item, amount in (
        ("training_update", update),
        ("training_sample_epoch", sample_epoch),
        ("training_reserve_samples", reserve_samples),
    ):
        r = await http.put(f"{url}/api/billing/prices/{item}/", headers=admin, json={"amount": amount})
        assert r.status_code == 200, r.text


async def top_up(http: httpx.AsyncClient, url: str, admin: dict[str, str], user_id: str, amount: str) -> None:
    r = await http.post(
        f"{url}/api/billing/top-ups/", headers=admin, json={"user_id": user_id, "amount": amount}
    )
    assert r.status_code == 201, r.text


async def usd_balance(
    http: httpx.AsyncClient, url: str, admin: dict[str, str], user_id: str
) -> tuple[Decimal, Decimal]:
    """(available, held) USD of a user."""
    r = await http.get(f"{url}/api/billing/balance/", headers=admin, params={"user_id": user_id})
    assert r.status_code == 200, r.text
    line = next(b for b in r.json()["balances"] if b["currency"] == "USD")
    return Decimal(line["available"]), Decimal(line["held"])


async def training_charges(
    http: httpx.AsyncClient, url: str, admin: dict[str, str], user_id: str
) -> list[dict[str, Any]]:
    r = await http.get(
        f"{url}/api/billing/operations/",
        headers=admin,
        params={"user_id": user_id, "kind": "training", "limit": 1000},
    )
    assert r.status_code == 200, r.text
    return list(r.json())


async def reconciles(http: httpx.AsyncClient, url: str, admin: dict[str, str]) -> dict[str, Any]:
    r = await http.get(f"{url}/api/billing/reconciliation/", headers=admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


class SmallNet(torch.nn.Module):
    """Float parameters only, so FedAvg has no integer-buffer rounding to reason about."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def scripted(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def state_of(data: bytes) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in torch.jit.load(io.BytesIO(data)).state_dict().items()}


def client_update(state: dict[str, torch.Tensor], client: int, round_: int) -> dict[str, torch.Tensor]:
    """Each client's deterministic 'local training': a distinct shift per client and round."""
    delta = 0.01 * (client + 1) + 0.1 * round_
    return {k: v + delta for k, v in state.items()}


def as_safetensors(state: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in state.items()})


def fedavg(states: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Independent FedAvg for the assertions (float64 accumulation)."""
    total = float(sum(sizes))
    return {
        key: (sum(s[key].to(torch.float64) * n for s, n in zip(states, sizes, strict=True)) / total).to(
            ref.dtype
        )
        for key, ref in states[0].items()
    }


async def upload_model(http: httpx.AsyncClient, url: str, headers: dict[str, str], data: bytes) -> str:
    form = {"name": "small", "description": "scale test net", "type": "GLOBAL"}
    r = await http.post(
        f"{url}/api/models/", headers=headers, data=form, files={"model_file": ("m.pt", data)}
    )
    assert r.status_code == 201, r.text
    return r.json()["model_id"]


async def post_update(
    http: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    model_id: str,
    data: bytes,
    round_: int,
    sample_size: int,
) -> httpx.Response:
    form = {"round": str(round_), "sample_size": str(sample_size)}
    return await http.post(
        f"{url}/api/models/{model_id}/",
        headers=headers,
        data=form,
        files={"model_file": ("u.safetensors", data)},
    )


async def training_state(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], training_id: str
) -> dict[str, Any]:
    r = await http.get(f"{url}/api/trainings/{training_id}/", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def wait_for(
    http: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    training_id: str,
    predicate: Any,
    timeout: float = 60.0,
    what: str = "condition",
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = await training_state(http, url, headers, training_id)
        if predicate(state):
            return state
        if state["state"] == "E":
            raise AssertionError(f"training failed: {state.get('error_reason')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached; last state {state}")
        await asyncio.sleep(0.1)
