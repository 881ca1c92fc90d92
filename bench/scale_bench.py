"""Scale-out figure: rounds per minute and uploads per second with 1, 2 and 4 uvicorn workers
(``uvicorn --workers N``, one port, the kernel spreads connections) on one throwaway PostgreSQL.

For each worker count: a fresh database (migrated), an actor, ``--clients`` clients and a
training of ``--rounds`` FedAvg rounds (``skip_model_tests``) over a small MLP. Each round every
client downloads the global model and all clients then upload their update at the same moment;
the round's aggregation runs as a work-queue job in whichever worker claims it.

* uploads/s: the round's uploads divided by the time from the first upload sent to the last
  response (the burst; authentication, validation of the safetensors update, the DB write).
* rounds/min: rounds divided by the time from round 0 opening to the training's completion
  (downloads, uploads, aggregation, the next round's start: what a federation actually waits).
* aggregation ms: last upload answered → next round open (claim, job, FedAvg, commit).
* CPU seconds during the rounds of the uvicorn processes, the PostgreSQL backends, this client
  process and the whole machine (other users' work included), from ``/proc``: on a shared
  machine the last column says how contended the figures are.

Run from the repository root, un-niced: ``.venv/bin/python bench/scale_bench.py``. Prints a
table; asserts nothing about time. Needs ``initdb``/``pg_ctl`` on PATH (PostgreSQL 15).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Cheap password hashing for the setup logins; a fixed secret shared by every worker.
os.environ.setdefault("FLP_ARGON2_TIME_COST", "1")
os.environ.setdefault("FLP_ARGON2_MEMORY_COST_KIB", "64")
os.environ.setdefault("FLP_SECRET_KEY", "bench-secret-key-not-for-production")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from flplatform.db import create_engine, create_sessionmaker  # noqa: E402
from flplatform.migrate import upgrade  # noqa: E402
from flplatform.orm import Server  # noqa: E402
from tests.conftest import free_port, start_postgres  # noqa: E402
from tests.scale.harness import (  # noqa: E402
    admin_headers,
    as_safetensors,
    create_account,
    create_admin,
    post_update,
    scripted,
    state_of,
    training_state,
    upload_model,
)


class BenchNet(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, width)
        self.fc2 = torch.nn.Linear(width, width)
        self.fc3 = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ..." — comm may contain spaces; split after the last ")".
    return [pid, *raw[raw.rindex(")") + 2 :].split()]


def cpu_seconds(pgid: int | None = None, parent: int | None = None) -> float:
    """CPU time (user + system) of the processes in process group ``pgid`` (the uvicorn master and
    its workers), or of ``parent`` and its children (the PostgreSQL postmaster and its backends)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(entry)
        if fields is None:
            continue
        pid, ppid, pgrp = int(fields[0]), int(fields[2]), int(fields[3])
        if (pgid is not None and pgrp == pgid) or (parent is not None and parent in (pid, ppid)):
            total += int(fields[12]) + int(fields[13])  # utime, stime (fields 14 and 15 of stat)
    return total / TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (every user's work)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICKS, sum(values) / TICKS


@dataclass
class Result:
    workers: int
    rounds: int
    uploads: int
    seconds: float
    burst_seconds: list[float]
    aggregation_seconds: list[float]
    server_cpu: float = 0.0  # CPU seconds of the uvicorn processes during the rounds
    postgres_cpu: float = 0.0
    client_cpu: float = 0.0  # this process (the simulated clients: downloads, jit loads, uploads)
    machine_cpu: float = 0.0  # every process on the machine, other users' work included

    @property
    def rounds_per_minute(self) -> float:
        return 60.0 * self.rounds / self.seconds

    @property
    def uploads_per_second(self) -> float:
        return self.uploads / sum(self.burst_seconds)


def start_uvicorn(env: dict[str, str], port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
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
                "--workers",
                str(workers),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def ready_servers(db_url: str) -> int:
    """Worker processes whose in-process queue worker registered itself (one per uvicorn worker)."""
    engine = create_engine(db_url)
    try:
        async with create_sessionmaker(engine)() as session:
            return int(
                (
                    await session.execute(select(func.count()).select_from(Server).where(Server.ready))
                ).scalar_one()
            )
    finally:
        await engine.dispose()


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, db_url: str, workers: int, log: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            healthy = httpx.get(url + "/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy and asyncio.run(ready_servers(db_url)) >= workers:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{workers} workers did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def drive(
    url: str, clients: int, rounds: int, width: int, on_start: Any
) -> tuple[float, list[float], list[float]]:
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as http:
        admin = await admin_headers(http, url)
        actor = await create_account(http, url, admin, "actor", actor=True)
        accounts = [
            await create_account(http, url, admin, f"client-{i:03d}", client=True) for i in range(clients)
        ]
        torch.manual_seed(0)
        model_id = await upload_model(http, url, actor.headers, scripted(BenchNet(width)))
        body = {
            "model_id": model_id,
            "target_num_updates": rounds,
            "aggregation_method": "FedAvg",
            "clients": [a.id for a in accounts],
            "options": {"skip_model_tests": True},
        }
        r = await http.post(f"{url}/api/trainings/", headers=actor.headers, json=body)
        assert r.status_code == 201, r.text
        training_id = r.json()["training_id"]

        async def wait_round(round_: int) -> None:
            while True:
                s = await training_state(http, url, actor.headers, training_id)
                if s["state"] == "E":
                    raise RuntimeError(f"training failed: {s['error_reason']}")
                if s["state"] == "C" or (s["round"] == round_ and s["phase"] == "update" and not s["locked"]):
                    return
                await asyncio.sleep(0.01)

        r = await http.post(f"{url}/api/trainings/{training_id}/start/", headers=actor.headers)
        assert r.status_code == 202, r.text
        await wait_round(0)
        bursts: list[float] = []
        aggregations: list[float] = []
        on_start()
        began = time.perf_counter()
        for round_ in range(rounds):

            async def download(account: object) -> bytes:
                r = await http.get(f"{url}/api/models/{model_id}/", headers=account.headers)  # type: ignore[attr-defined]
                assert r.status_code == 200, r.text
                return r.content

            globals_ = await asyncio.gather(*(download(a) for a in accounts))
            updates = []
            for i, data in enumerate(globals_):
                state = state_of(data)
                updates.append(as_safetensors({k: v + 0.001 * (i + 1) for k, v in state.items()}))
            burst = time.perf_counter()
            answers = await asyncio.gather(
                *(
                    post_update(http, url, a.headers, model_id, u, round_, 10 + i)
                    for i, (a, u) in enumerate(zip(accounts, updates, strict=True))
                )
            )
            assert all(r.status_code == 201 for r in answers), [
                r.text for r in answers if r.status_code != 201
            ][:3]
            answered = time.perf_counter()
            bursts.append(answered - burst)
            await wait_round(round_ + 1)
            aggregations.append(time.perf_counter() - answered)
        final = await training_state(http, url, actor.headers, training_id)
        assert final["state"] == "C" and final["round"] == rounds, final
        return time.perf_counter() - began, bursts, aggregations


def run_one(cluster: object, workers: int, args: argparse.Namespace, logdir: Path) -> Result:
    db_url = cluster.create_database(f"flp_bench_{workers}")  # type: ignore[attr-defined]
    upgrade(db_url)
    create_admin(db_url)
    env = dict(os.environ)
    env.update(
        FLP_DATABASE_URL=db_url,
        FLP_LOG_LEVEL="WARNING",
        FLP_TRAINING_SWEEP_INTERVAL_SECONDS="0.5",
        FLP_DB_POOL_SIZE="5",
        FLP_DB_MAX_OVERFLOW="10",
        OMP_NUM_THREADS="1",
    )
    port = free_port()
    log = logdir / f"uvicorn-{workers}.log"
    proc = start_uvicorn(env, port, workers, log)
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])  # type: ignore[attr-defined]

    def sample() -> tuple[float, float, float, float]:
        return (
            cpu_seconds(pgid=proc.pid),
            cpu_seconds(parent=postmaster),
            time.process_time(),
            machine_busy()[0],
        )

    before: list[tuple[float, float, float, float]] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, db_url, workers, log)
        seconds, bursts, aggregations = asyncio.run(
            drive(url, args.clients, args.rounds, args.width, lambda: before.append(sample()))
        )
        after = sample()
    finally:
        stop(proc)
    server, postgres, client, machine = (a - b for a, b in zip(after, before[0], strict=True))
    return Result(
        workers,
        args.rounds,
        args.clients * args.rounds,
        seconds,
        bursts,
        aggregations,
        server_cpu=server,
        postgres_cpu=postgres,
        client_cpu=client,
        machine_cpu=machine,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated uvicorn worker counts")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--width", type=int, default=256, help="hidden width of the MLP (256: 84k parameters)"
    )
    args = parser.parse_args()
    params = sum(p.numel() for p in BenchNet(args.width).parameters())
    base = Path(tempfile.mkdtemp(prefix="flp-bench-pg-"))
    base.chmod(0o755)
    load_before = os.getloadavg()
    cluster = start_postgres(base)
    results: list[Result] = []
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            results.append(run_one(cluster, workers, args, base))
            print(f"  {workers} worker(s) done", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    print(
        f"{args.clients} clients, {args.rounds} rounds, MLP of {params:,} parameters "
        f"({params * 4 / 1e6:.2f} MB float32 update); load average before {load_before[0]:.1f}, "
        f"after {load_after[0]:.1f}\n"
    )
    print(
        "| uvicorn workers | rounds/min | uploads/s (burst) | median upload burst ms | median aggregation ms "
        "| CPU s: servers / PostgreSQL / clients / whole machine | machine cores busy |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r.workers} | {r.rounds_per_minute:.1f} | {r.uploads_per_second:.1f} | "
            f"{1000 * statistics.median(r.burst_seconds):.0f} | {1000 * statistics.median(r.aggregation_seconds):.0f} "
            f"| {r.server_cpu:.1f} / {r.postgres_cpu:.1f} / {r.client_cpu:.1f} / {r.machine_cpu:.1f} "
            f"| {r.machine_cpu / r.seconds:.2f} of {os.cpu_count()} |"
        )


if __name__ == "__main__":
    main()
