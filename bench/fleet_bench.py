"""Fleet size: does a sampled round cost the same with 200 or 5,000 registered clients?

For each N of ``--clients`` (default 200,1000,5000): a fresh database (migrated), N client users
with their primary tokens written straight into it in bulk (a bench, not a test: 5,000 password
hashes through the API would take minutes and measure nothing of interest), one actor created
through the API, a FedAvg training over a small MLP with all N as participants and
``options.clients_per_round`` (default 20, ``skip_model_tests``). Everything measured goes through
the HTTP API of one real server process (``uvicorn flplatform.app:create_app``, bench/
update_path_bench.py's ``start_server``): each round the bench reads the round's selection
(``GET /api/trainings/{id}/rounds/?limit=1``, once per round) and the selected clients upload a
small safetensors update at the same moment; the next round's selection is waited for in the
database (every ``--poll`` seconds, 0.05: polling a training route instead would load the server
with the polls). Reported per N:

* **round s**: from one ``round_started`` event to the next (server timestamps, ``training_events``),
  median over the rounds after the first (a warm-up);
* **last upload → next round s**: the last upload's response → the next round's selection seen
  (the aggregation of the 20 updates, the draw among N, the notifications, the commit), median;
* **detail ms**: ``GET /api/trainings/{id}/`` as the actor (median of ``--gets``), and its size
  (it lists ``participant_status`` for every participant); **paged detail ms**: the same with
  ``?participants_limit=20`` (one page of ``participant_status``);
* **rounds ms**: ``GET /api/trainings/{id}/rounds/?limit=1`` likewise;
* **start notifications drained s**: the start → no TRAINING_START notification pending (one per
  participant; the rounds are measured after it);
* **server CPU s / round**: user + system time of the server process over the rounds (``/proc``),
  divided by the rounds; and the load average (the machine may be shared).

Run from the repository root, un-niced: ``.venv/bin/python bench/fleet_bench.py`` (``--database
postgresql`` for a throwaway PostgreSQL cluster; needs ``initdb``/``pg_ctl`` on PATH). Prints a
table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("FLP_ARGON2_TIME_COST", "1")
os.environ.setdefault("FLP_ARGON2_MEMORY_COST_KIB", "64")
os.environ.setdefault("FLP_SECRET_KEY", "bench-secret-key-not-for-production")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402
from update_path_bench import proc_cpu, start_server, stop_server  # noqa: E402

from flplatform.auth.credentials import encrypt, new_user_token, token_digest  # noqa: E402
from flplatform.auth.login_names import login_key  # noqa: E402
from flplatform.db import create_engine, create_sessionmaker  # noqa: E402
from flplatform.migrate import upgrade  # noqa: E402
from flplatform.orm import (  # noqa: E402
    ApiToken,
    LoginName,
    Notification,
    NotificationStatus,
    RoundSelection,
    User,
)
from flplatform.orm.base import utcnow  # noqa: E402
from flplatform.orm.training_event import TrainingEvent  # noqa: E402
from tests.conftest import start_postgres  # noqa: E402
from tests.scale.harness import (  # noqa: E402
    admin_headers,
    as_safetensors,
    create_account,
    create_admin,
    post_update,
    scripted,
    upload_model,
)


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


# --------------------------------------------------------------------------- bulk set-up


def bulk_clients(db_url: str, count: int) -> dict[str, str]:
    """``count`` client users with a primary token each, inserted in bulk; returns id → token."""

    async def _run() -> dict[str, str]:
        engine = create_engine(db_url)
        now = utcnow()
        users, names, tokens, out = [], [], [], {}
        for i in range(count):
            user_id = uuid.uuid4()
            username = f"client-{i:05d}"
            email = f"{username}@example.org"
            token = new_user_token()
            out[str(user_id)] = token
            users.append(
                {"id": user_id, "username": username, "email": email, "client": True, "password_hash": None}
            )
            names += [
                {"name": login_key(username), "user_id": user_id},
                {"name": login_key(email), "user_id": user_id},
            ]
            tokens.append(
                {
                    "id": uuid.uuid4(),
                    "user_id": user_id,
                    "name": "primary",
                    "digest": token_digest(token),
                    "prefix": token[:8],
                    "is_primary": True,
                    "encrypted": encrypt(token),
                    "created_at": now,
                }
            )
        try:
            async with create_sessionmaker(engine)() as session:
                for table, rows in ((User, users), (LoginName, names), (ApiToken, tokens)):
                    for start in range(0, len(rows), 1000):
                        await session.execute(insert(table), rows[start : start + 1000])
                await session.commit()
        finally:
            await engine.dispose()
        return out

    return asyncio.run(_run())


def pending_notifications(db_url: str) -> int:
    async def _run() -> int:
        engine = create_engine(db_url)
        try:
            async with create_sessionmaker(engine)() as session:
                return int(
                    (
                        await session.execute(
                            select(func.count())
                            .select_from(Notification)
                            .where(
                                Notification.status.in_(
                                    (NotificationStatus.PENDING, NotificationStatus.SENDING)
                                )
                            )
                        )
                    ).scalar_one()
                )
        finally:
            await engine.dispose()

    return asyncio.run(_run())


def newest_selection(db_url: str, training_id: str) -> int:
    """The newest round with a recorded selection (-1: none yet)."""

    async def _run() -> int:
        engine = create_engine(db_url)
        try:
            async with create_sessionmaker(engine)() as session:
                found = (
                    await session.execute(
                        select(func.max(RoundSelection.round)).where(
                            RoundSelection.training_id == uuid.UUID(training_id)
                        )
                    )
                ).scalar_one_or_none()
                return -1 if found is None else int(found)
        finally:
            await engine.dispose()

    return asyncio.run(_run())


def round_starts(db_url: str, training_id: str) -> list[float]:
    """Server timestamps (s) of the training's ``round_started`` events, in order."""

    async def _run() -> list[float]:
        engine = create_engine(db_url)
        try:
            async with create_sessionmaker(engine)() as session:
                rows = await session.execute(
                    select(TrainingEvent.created_at)
                    .where(
                        TrainingEvent.training_id == uuid.UUID(training_id),
                        TrainingEvent.kind == "round_started",
                    )
                    .order_by(TrainingEvent.seq)
                )
                return [t.timestamp() for t in rows.scalars()]
        finally:
            await engine.dispose()

    return asyncio.run(_run())


# --------------------------------------------------------------------------- the rounds


@dataclass
class Result:
    clients: int
    selected: int = 0
    after_last_upload: list[float] = field(default_factory=list)
    bursts: list[float] = field(default_factory=list)
    detail: list[float] = field(default_factory=list)
    detail_bytes: int = 0
    detail_paged: list[float] = field(default_factory=list)
    rounds_get: list[float] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    cpu_per_round: float = 0.0
    setup_seconds: float = 0.0
    start_drain: float = 0.0  # start → every TRAINING_START notification handled


async def timed_get(
    http: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    r = await http.get(url, headers=headers)
    assert r.status_code == 200, r.text
    return time.perf_counter() - started, r


async def drive(
    url: str, db_url: str, tokens: dict[str, str], args: argparse.Namespace, pid: int, result: Result
) -> str:
    limits = httpx.Limits(max_connections=args.per_round + 10, max_keepalive_connections=args.per_round + 10)
    async with httpx.AsyncClient(timeout=300.0, limits=limits) as http:
        admin = await admin_headers(http, url)
        actor = await create_account(http, url, admin, "actor", actor=True)
        torch.manual_seed(0)
        net = SmallNet()
        model_id = await upload_model(http, url, actor.headers, scripted(net))
        state = {k: v.detach() for k, v in net.state_dict().items()}
        body = {
            "model_id": model_id,
            "target_num_updates": args.rounds + 1,  # the bench stops when round `rounds` opens
            "aggregation_method": "FedAvg",
            "clients": list(tokens),
            "options": {"skip_model_tests": True, "clients_per_round": args.per_round, "seed": 1},
        }
        r = await http.post(f"{url}/api/trainings/", headers=actor.headers, json=body)
        assert r.status_code == 201, r.text
        training_id = r.json()["training_id"]
        detail_url = f"{url}/api/trainings/{training_id}/"
        rounds_url = f"{url}/api/trainings/{training_id}/rounds/?limit=1"

        async def selection(round_: int) -> list[str]:
            # Wait for the round's recorded selection straight in the database (cheap, outside the
            # server: polling a training route would load the server with the polls), then read
            # it through the API, once.
            while await asyncio.to_thread(newest_selection, db_url, training_id) < round_:
                await asyncio.sleep(args.poll)
            _, r = await timed_get(http, rounds_url, actor.headers)
            page = r.json()
            assert page and page[0]["round"] >= round_, page
            return [str(u) for u in page[0]["selected"]]

        r = await http.post(f"{url}/api/trainings/{training_id}/start/", headers=actor.headers)
        assert r.status_code == 202, r.text
        started = time.perf_counter()
        chosen = await selection(0)
        # TRAINING_START goes to every participant: N notifications (these users have no message
        # endpoint: their rows are written already dropped; before, the dispatcher claimed and
        # finished each). Measured apart, and waited for, so the rounds measured do not overlap it.
        while await asyncio.to_thread(pending_notifications, db_url):
            await asyncio.sleep(0.5)
        result.start_drain = time.perf_counter() - started
        cpu_before = proc_cpu(pid)
        for round_ in range(args.rounds):
            result.selected = len(chosen)
            updates = [
                as_safetensors({k: v + 0.001 * (i + 1) for k, v in state.items()}) for i in range(len(chosen))
            ]
            started = time.perf_counter()
            answers = await asyncio.gather(
                *(
                    post_update(
                        http, url, {"Authorization": f"Token {tokens[uid]}"}, model_id, u, round_, 10 + i
                    )
                    for i, (uid, u) in enumerate(zip(chosen, updates, strict=True))
                )
            )
            answered = time.perf_counter()
            assert all(a.status_code == 201 for a in answers), [
                a.text for a in answers if a.status_code != 201
            ][:3]
            chosen = await selection(round_ + 1)
            result.bursts.append(answered - started)
            result.after_last_upload.append(time.perf_counter() - answered)
        result.cpu_per_round = (proc_cpu(pid) - cpu_before) / args.rounds
        for _ in range(args.gets):
            seconds, r = await timed_get(http, detail_url, actor.headers)
            result.detail.append(seconds)
            result.detail_bytes = len(r.content)
            seconds, _ = await timed_get(http, rounds_url, actor.headers)
            result.rounds_get.append(seconds)
            seconds, _ = await timed_get(http, f"{detail_url}?participants_limit=20", actor.headers)
            result.detail_paged.append(seconds)
        return training_id


def run_one(kind: str, db_url: str, clients: int, args: argparse.Namespace, workdir: Path) -> Result:
    result = Result(clients)
    started = time.perf_counter()
    upgrade(db_url)
    create_admin(db_url)
    tokens = bulk_clients(db_url, clients)
    result.setup_seconds = time.perf_counter() - started
    os.environ["FLP_BLOB_DIR"] = str(workdir / f"blobs-{kind}-{clients}")
    proc, url = start_server(db_url, workdir / f"server-{kind}-{clients}.log")
    try:
        training_id = asyncio.run(drive(url, db_url, tokens, args, proc.pid, result))
    finally:
        stop_server(proc)
    starts = round_starts(db_url, training_id)
    # The first round also waited for the start's notifications to settle: left out (warm-up).
    result.round_seconds = [b - a for a, b in zip(starts[1:], starts[2:], strict=False)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="200,1000,5000", help="registered participants, comma-separated")
    parser.add_argument("--per-round", type=int, default=20, help="options.clients_per_round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--poll",
        type=float,
        default=0.2,
        help="seconds between polls for the next round (each poll is a GET)",
    )
    parser.add_argument("--gets", type=int, default=10, help="timed GETs of the training detail")
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="flp-fleet-bench-"))
    base.chmod(0o755)
    load_before = os.getloadavg()
    cluster = None
    results: list[Result] = []
    try:
        for n in (int(c) for c in args.clients.split(",")):
            if args.database == "sqlite":
                db_url = f"sqlite+aiosqlite:///{base}/fleet-{n}.db"
            else:
                if cluster is None:
                    (base / "pg").mkdir(mode=0o755)
                    cluster = start_postgres(base / "pg")
                db_url = cluster.create_database(f"flp_fleet_{n}")
            results.append(run_one(args.database, db_url, n, args, base))
            print(f"  {n} clients done", file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {args.database}"
    )
    print(
        f"clients_per_round {args.per_round}, {args.rounds} rounds, FedAvg over a "
        f"{sum(p.numel() for p in SmallNet().parameters())}-parameter MLP; load average before "
        f"{load_before[0]:.1f}, after {load_after[0]:.1f}\n"
    )
    print(
        "| registered | selected | round s (median / each) | upload burst s | last upload → next round s "
        "| detail GET ms (KB) | paged detail GET ms | rounds GET ms | server CPU s / round "
        "| start notifications drained s | set-up s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        each = " ".join(f"{s:.2f}" for s in r.round_seconds)
        print(
            f"| {r.clients:,} | {r.selected} | {statistics.median(r.round_seconds):.2f} / {each} "
            f"| {statistics.median(r.bursts):.2f} | {statistics.median(r.after_last_upload):.2f} "
            f"| {1000 * statistics.median(r.detail):.0f} ({r.detail_bytes / 1000:.0f}) "
            f"| {1000 * statistics.median(r.detail_paged):.0f} "
            f"| {1000 * statistics.median(r.rounds_get):.0f} | {r.cpu_per_round:.2f} | {r.start_drain:.1f} | {r.setup_seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
