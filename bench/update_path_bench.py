"""Server CPU per client update: ``POST /api/models/{id}/`` by a participant during a training's
update phase, a 0.34 MB safetensors body (the MLP of ``bench/scale_bench.py``, 85,002 float32
parameters), token authentication (``Authorization: Token …``).

Two measurements per database (SQLite file, and a throwaway PostgreSQL 15 cluster):

* **server**: one real ``uvicorn flplatform.app:create_app`` process (as ``flplatform serve``
  runs it). ``--runs`` batches of ``--per-run`` uploads, sent one after another on a keep-alive
  connection, each by a different participant (the insert path; one participant never uploads,
  so the round stays open), then one batch of re-uploads (the replace path). CPU is the server
  process's ``utime + stime`` from ``/proc`` over the batch, divided by its uploads; the
  server's idle CPU over the same time (sweeper, queue poll) is measured apart and printed. On
  PostgreSQL the backends' CPU is printed too (that is the database's, not the server's).
* **phases** (``--phases``): the same requests through the app in this process
  (``httpx.ASGITransport``), each followed by its after-commit advance before the next one
  starts, with ``time.process_time`` (every thread of the process) around the parts of the
  path: guard + token authentication, multipart parsing, caller/requester/model loading, the
  round rules (training + share lock, the global spec), safetensors decode, validation
  (names, shapes, dtypes, finiteness) and re-encoding, row writes, commit, the
  advance-after-commit (training row lock, arrivals). "rest" is routing, FastAPI's parameter
  handling, the response and this process's own client. ``--profile`` adds a cProfile table.

Run from the repository root, un-niced: ``.venv/bin/python bench/update_path_bench.py``
(``--db sqlite`` or ``--db postgresql`` for one). Prints tables; asserts nothing about time.
Needs ``initdb``/``pg_ctl`` on PATH for PostgreSQL.

Size: one script on purpose: the server runs, the in-process phases and the report share one set-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("FLP_ARGON2_TIME_COST", "1")
os.environ.setdefault("FLP_ARGON2_MEMORY_COST_KIB", "64")
os.environ.setdefault("FLP_SECRET_KEY", "bench-secret-key-not-for-production")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from tests.conftest import free_port, start_postgres  # noqa: E402
from tests.scale.harness import (  # noqa: E402
    Account,
    admin_headers,
    as_safetensors,
    create_account,
    create_admin,
    scripted,
    state_of,
    training_state,
    upload_model,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchNet(torch.nn.Module):
    """bench/scale_bench.py's MLP: 64 → 256 → 256 → 10, 85,002 parameters (0.34 MB float32)."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, width)
        self.fc2 = torch.nn.Linear(width, width)
        self.fc3 = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu(parent: int) -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def multipart(data: bytes, round_: int, sample_size: int) -> tuple[bytes, str]:
    """The body a client sends (built once, so the loop measures the server, not httpx)."""
    request = httpx.Request(
        "POST",
        "http://x/",
        data={"round": str(round_), "sample_size": str(sample_size)},
        files={"model_file": ("u.safetensors", data)},
    )
    return request.read(), request.headers["content-type"]


class Setup:
    def __init__(self, accounts: list[Account], model_id: str, training_id: str, update: bytes) -> None:
        self.accounts, self.model_id, self.training_id, self.update = accounts, model_id, training_id, update


async def prepare(http: httpx.AsyncClient, url: str, clients: int) -> Setup:
    """Actor, ``clients`` participants plus one that never uploads, the training in round 0."""
    admin = await admin_headers(http, url)
    actor = await create_account(http, url, admin, "actor", actor=True)
    accounts = [await create_account(http, url, admin, f"c{i:04d}", client=True) for i in range(clients + 1)]
    torch.manual_seed(0)
    model_id = await upload_model(http, url, actor.headers, scripted(BenchNet()))
    body = {
        "model_id": model_id,
        "target_num_updates": 2,
        "aggregation_method": "FedAvg",
        "clients": [a.id for a in accounts],
        "options": {"skip_model_tests": True},
    }
    r = await http.post(f"{url}/api/trainings/", headers=actor.headers, json=body)
    assert r.status_code == 201, r.text
    training_id = r.json()["training_id"]
    r = await http.post(f"{url}/api/trainings/{training_id}/start/", headers=actor.headers)
    assert r.status_code == 202, r.text
    for _ in range(500):
        s = await training_state(http, url, actor.headers, training_id)
        if s["phase"] == "update" and not s["locked"]:
            break
        await asyncio.sleep(0.02)
    r = await http.get(f"{url}/api/models/{model_id}/", headers=accounts[0].headers)
    assert r.status_code == 200, r.text
    for account in accounts:  # each client has looked at the model before it uploads (as clients do:
        # their token's coarse last_used_at is then fresh, and the upload writes no token row)
        info = await http.get(f"{url}/api/models/{model_id}/info/", headers=account.headers)
        assert info.status_code == 200, info.text
    update = as_safetensors({k: v + 0.001 for k, v in state_of(r.content).items()})
    return Setup(accounts[:clients], model_id, training_id, update)


async def post(
    http: httpx.AsyncClient, url: str, setup: Setup, account: Account, body: tuple[bytes, str]
) -> float:
    started = time.perf_counter()
    r = await http.post(
        f"{url}/api/models/{setup.model_id}/",
        headers={**account.headers, "Content-Type": body[1]},
        content=body[0],
    )
    wall = time.perf_counter() - started
    assert r.status_code == 201, r.text
    return wall


# --------------------------------------------------------------------------- server process


def start_server(
    db_url: str, log: Path, extra_args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    from flplatform.serving import uvicorn_ws_cli_args

    port = free_port()
    env = {**os.environ, "FLP_DATABASE_URL": db_url, "FLP_LOG_LEVEL": "WARNING", "PYTHONFAULTHANDLER": "1"}
    with open(log, "wb") as out:
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
                *extra_args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return proc, url
        if time.monotonic() > deadline:
            raise TimeoutError(log.read_text()[-3000:])
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        # A server gone before its bench ended: its exit status tells a crash (faulthandler's
        # traceback is in its log) from a signal sent from outside (negative: the signal number).
        print(f"  server {proc.pid} had already exited with status {proc.returncode}", file=sys.stderr)
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def measure_server(
    db_url: str, args: argparse.Namespace, workdir: Path, postmaster: int | None
) -> list[dict[str, Any]]:
    create_admin(db_url)
    proc, url = start_server(db_url, workdir / f"server-{uuid.uuid4().hex[:6]}.log")
    rows: list[dict[str, Any]] = []
    try:

        async def drive() -> None:
            async with httpx.AsyncClient(timeout=60.0) as http:
                setup = await prepare(http, url, args.runs * args.per_run)
                body = multipart(setup.update, 0, 10)
                # Whatever the set-up left running settles first; then the server's idle CPU
                # (sweeper, work-queue poll, heartbeat), before and after the batches.
                await asyncio.sleep(3.0)

                async def idle_rate() -> float:
                    c0, t0 = proc_cpu(proc.pid), time.perf_counter()
                    await asyncio.sleep(3.0)
                    return (proc_cpu(proc.pid) - c0) / (time.perf_counter() - t0)

                idle_before = await idle_rate()
                batches = [
                    ("insert", setup.accounts[i * args.per_run : (i + 1) * args.per_run])
                    for i in range(args.runs)
                ]
                batches.append(("replace", setup.accounts[: args.per_run]))
                for kind, accounts in batches:
                    pg0 = children_cpu(postmaster) if postmaster else 0.0
                    c0, t0 = proc_cpu(proc.pid), time.perf_counter()
                    walls = [await post(http, url, setup, a, body) for a in accounts]
                    await asyncio.sleep(0.05)  # the last advance-after-commit
                    seconds = time.perf_counter() - t0
                    cpu = proc_cpu(proc.pid) - c0
                    pg = (children_cpu(postmaster) - pg0) if postmaster else 0.0
                    rows.append(
                        {
                            "kind": kind,
                            "n": len(accounts),
                            "cpu_ms": 1000 * cpu / len(accounts),
                            "seconds": seconds,
                            "wall_ms": 1000 * statistics.median(walls),
                            "pg_ms": 1000 * pg / len(accounts),
                        }
                    )
                idle = min(idle_before, await idle_rate())
                for row in rows:
                    row["idle_ms"] = 1000 * idle * row["seconds"] / row["n"]

        asyncio.run(drive())
    finally:
        stop_server(proc)
    return rows


# --------------------------------------------------------------------------- phases in process


class Phases:
    """Inclusive ``time.process_time`` per phase, summed over the measured requests."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False

    def wrap_async(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)
        phases = self

        async def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return await original(*a, **k)
            finally:
                phases.calls[phase] += 1
                if phases.active:
                    phases.totals[phase] += time.process_time() - t0

        setattr(owner, name, wrapper)

    def wrap_sync(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)
        phases = self

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return original(*a, **k)
            finally:
                if phases.active:
                    phases.totals[phase] += time.process_time() - t0

        setattr(owner, name, wrapper)


def install_phases(phases: Phases) -> None:
    from starlette.requests import Request

    from flplatform import db
    from flplatform.auth import request_guard
    from flplatform.models import dependencies as model_deps
    from flplatform.models import files as model_files
    from flplatform.models import service as model_service
    from flplatform.permissions import requester as requester_module
    from flplatform.trainings import aggregate, contributions
    from flplatform.trainings.runtime import TrainingRuntime

    phases.wrap_async(request_guard._GuardedBody, "_before_body", "guard + token auth")
    phases.wrap_async(Request, "_get_form", "multipart form parsing")
    from flplatform.routers import models as models_router

    if hasattr(models_router, "stream_form"):  # uploads stream into the blob store's spool
        phases.wrap_async(models_router, "stream_form", "multipart form parsing")
    phases.wrap_async(requester_module.Requester, "reload", "caller, requester, model")
    phases.wrap_async(model_service, "get_model", "caller, requester, model")
    phases.wrap_async(model_deps, "ensure_visible", "caller, requester, model")
    phases.wrap_async(contributions, "add_update", "add_update")
    phases.wrap_async(contributions, "_participating_training", "round rules: training, global spec")
    phases.wrap_async(aggregate, "global_spec", "round rules: training, global spec")
    phases.wrap_async(model_files, "decode_state_dict_async", "safetensors decode")
    from flplatform.models import uploads

    if hasattr(uploads, "store_update"):  # streamed: values checked on the spooled file, then published
        phases.wrap_async(uploads, "store_update", "safetensors decode")
    if hasattr(model_files, "checked_update"):  # decode, validate and re-encode in one thread hop
        phases.wrap_sync(model_files, "checked_update", "safetensors decode")
    phases.wrap_sync(model_files, "validate_state_dict", "validate (names, shapes, dtypes, finite)")
    phases.wrap_sync(model_files, "encode_safetensors", "re-encode")
    phases.wrap_async(db, "commit_and_dispatch", "commit")
    # The upload's after-commit work: advance_if_due where it exists (it calls advance when due).
    after = "advance_if_due" if hasattr(TrainingRuntime, "advance_if_due") else "advance"
    phases.wrap_async(TrainingRuntime, after, "advance after commit")


async def measure_phases(db_url: str, args: argparse.Namespace) -> tuple[list[tuple[str, float]], float, str]:
    from flplatform.app import create_app
    from flplatform.settings import Settings

    await asyncio.to_thread(create_admin, db_url)
    phases = Phases()
    install_phases(phases)
    app = create_app(Settings(database_url=db_url, log_level="WARNING"))
    url = "http://testserver"
    n = args.runs * args.per_run
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=url, timeout=60.0) as http:
            setup = await prepare(http, url, n)
            body = multipart(setup.update, 0, 10)
            await asyncio.sleep(0.3)
            phases.active = True
            total = 0.0
            if profiler:
                profiler.enable()
            for account in setup.accounts:
                advanced = phases.calls["advance after commit"]
                t0 = time.process_time()
                await post(http, url, setup, account, body)
                while phases.calls["advance after commit"] == advanced:  # this upload's advance
                    await asyncio.sleep(0.001)
                total += time.process_time() - t0
            if profiler:
                profiler.disable()
            phases.active = False
    t = phases.totals
    from flplatform.models import files as model_files

    if hasattr(model_files, "checked_update"):
        # checked_update holds the validation and the re-encoding: decode is the rest of it
        t["safetensors decode"] -= t["validate (names, shapes, dtypes, finite)"] + t["re-encode"]
    rows = [
        ("guard + token auth", t["guard + token auth"]),
        # The guard runs on the body's first receive, inside the form parsing.
        ("multipart form parsing", t["multipart form parsing"] - t["guard + token auth"]),
        ("caller, requester, model", t["caller, requester, model"]),
        ("round rules: training, global spec", t["round rules: training, global spec"]),
        ("safetensors decode", t["safetensors decode"]),
        ("validate (names, shapes, dtypes, finite)", t["validate (names, shapes, dtypes, finite)"]),
        ("re-encode", t["re-encode"]),
    ]
    inner = sum(
        t[k]
        for k in (
            "round rules: training, global spec",
            "safetensors decode",
            "validate (names, shapes, dtypes, finite)",
            "re-encode",
        )
    )
    rows.append(("row writes (rest of add_update)", t["add_update"] - inner))
    rows.append(("commit", t["commit"]))
    rows.append(("advance after commit (row lock, arrivals)", t["advance after commit"]))
    rows.append(("rest (routing, FastAPI, response, test client)", total - sum(v for _, v in rows)))
    per = [(name, 1000 * v / n) for name, v in rows]
    report = ""
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        report = out.getvalue()
    return per, 1000 * total / n, report


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def databases(which: list[str], base: Path) -> Iterator[Callable[[str], tuple[str, int | None]]]:
    cluster = None
    if "postgresql" in which:
        (base / "pg").mkdir(mode=0o755)
        cluster = start_postgres(base / "pg")
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0]) if cluster else None
    counter = iter(range(1000))

    def new(kind: str) -> tuple[str, int | None]:
        from flplatform.migrate import upgrade

        i = next(counter)
        if kind == "sqlite":
            url = f"sqlite+aiosqlite:///{base}/bench-{i}.db"
            upgrade(url)
            return url, None
        assert cluster is not None
        url = cluster.create_database(f"flp_update_{i}")
        upgrade(url)
        return url, postmaster

    try:
        yield new
    finally:
        if cluster is not None:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--runs", type=int, default=5, help="batches of first uploads")
    parser.add_argument("--per-run", type=int, default=20, help="uploads per batch")
    parser.add_argument("--phases", action="store_true", help="also the in-process breakdown by phase")
    parser.add_argument("--no-server", action="store_true", help="only the in-process breakdown")
    parser.add_argument("--profile", type=int, default=0, help="with --phases: print the N top cProfile rows")
    args = parser.parse_args()
    which = [d.strip() for d in args.db.split(",") if d.strip()]
    base = Path(tempfile.mkdtemp(prefix="flp-update-bench-"))
    base.chmod(0o755)
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    try:
        with databases(which, base) as new_db:
            for kind in which:
                if not args.no_server:
                    url, postmaster = new_db(kind)
                    results[(kind, "server")] = measure_server(url, args, base, postmaster)
                if args.phases or args.no_server:
                    url, _ = new_db(kind)
                    results[(kind, "phases")] = asyncio.run(measure_phases(url, args))
                print(f"  {kind} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    print("0.34 MB safetensors update (85,002 float32), token auth, one upload at a time\n")
    for kind in which:
        rows = results.get((kind, "server"))
        if rows:
            print(f"### {kind}: server process (uvicorn), per update")
            print(
                "| batch | uploads | server CPU ms | of which the idle server's ms | median wall ms "
                "| PostgreSQL backends CPU ms (approx.) |"
            )
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for r in rows:
                pg = f"{r['pg_ms']:.1f}" if kind == "postgresql" else "—"
                print(
                    f"| {r['kind']} | {r['n']} | {r['cpu_ms']:.1f} | {r['idle_ms']:.1f} | {r['wall_ms']:.1f} | {pg} |"
                )
            inserts = [r["cpu_ms"] for r in rows if r["kind"] == "insert"]
            print(
                f"\ninsert batches: min {min(inserts):.1f}, median {statistics.median(inserts):.1f}, "
                f"max {max(inserts):.1f} ms; every batch ≤ 10 ms: {all(v <= 10 for v in inserts)}\n"
            )
        phases = results.get((kind, "phases"))
        if phases:
            per, total, report = phases
            print(f"### {kind}: phases in process (process CPU ms per update, inclusive)")
            print("| phase | CPU ms |")
            print("| --- | ---: |")
            for name, ms in per:
                print(f"| {name} | {ms:.2f} |")
            print(f"| **total** | **{total:.2f}** |\n")
            if report:
                print(report)


if __name__ == "__main__":
    main()
