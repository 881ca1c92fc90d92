"""Real-size rounds: N clients × an M MB model on the default server (SQLite) and on PostgreSQL.

One server process (``uvicorn flplatform.app:create_app``, what ``flplatform serve`` runs; its
defaults, a filesystem blob store in the run's directory), a FedAvg training of ``--rounds`` rounds
(``skip_model_tests``) over an MLP sized to ``--mb`` MB of float32 weights, ``--clients``
participants. Each round every client uploads its safetensors update at the same moment (bodies
built beforehand: the bench measures the server, not httpx). Reported per database:

* **upload burst**: the round's update bytes ÷ (first upload sent → last response), median of the
  rounds (and the best);
* **last upload → next round**: last response → the next round's ``round_started`` event received
  on the training's event stream (``GET /api/trainings/{id}/events/``, the way a client learns
  it; recorded in the transaction that starts the round, so the training is then in its update
  phase, unlocked): the aggregation, the new global model, the commits, the event's delivery.
  ``--poll-ms N`` polls the training row every N ms instead (runs before 2026-12-04 22:55 UTC
  polled every 5 ms: ~200 requests a second that compete with the close for the server's CPU,
  more so on PostgreSQL, where each is also a query in another process);
* **kernel**: ``flplatform.aggregation.fedavg`` over the same N updates as bytes in this process
  (what the aggregation would cost with everything already in memory);
* **server peak RSS**: ``VmHWM`` of the server process from ``/proc`` — over the rounds (the peak
  is reset with ``clear_refs`` after the set-up) and over the whole run (the set-up uploads the
  TorchScript global model); the model sandbox's processes are apart and not counted; and the
  resident set sampled every 5 ms, its peak per phase (the uploads, the close: last response →
  next round, idle), which says which copies are alive at the peak (``--timeline DIR``: every
  sample, anonymous and file-backed, to ``DIR/timeline-<database>.csv``);
* **server CPU per burst**: CPU seconds of the server's event loop (its main thread) and of its other
  threads (hashing and spool writes, the values check, the fold on arrival, the SQLite driver)
  from ``/proc`` over each round's uploads, and the kernel (system) part of it; with the machine's
  ``/proc/vmstat`` memory counters over each burst (direct reclaim, compaction, kswapd);
* the machine's own **loopback** TCP bandwidth and **fdatasync** write bandwidth (the blob store's
  filesystem), measured in the same run, and the load average (the machine may be shared).
* ``--phases``: the close step by step, from the server's own marks (the ``flplatform.timeline``
  logger at DEBUG through a ``--log-config``; :mod:`flplatform.kit.timeline`) lined up with this
  process's clock: ms per step and per phase (the last fold and the claim, settle, recompute, the
  archive, the database and commit, the event's delivery), per round and median.

Run from the repository root, un-niced: ``.venv/bin/python bench/round_bench.py --clients 8 --mb 68``
(``--database sqlite`` or ``postgresql`` for one; ``--no-fold`` folds every round only at its close,
``FLP_FOLD_MAX_OPEN_ROUNDS=0``). Prints a table; asserts nothing about time. Needs
``initdb``/``pg_ctl`` on PATH for PostgreSQL.

Models of several GB (``--large``, automatic from 1000 MB): the global model and the updates are
written to files in the run's directory (``--workdir``; ≈ (clients + 1) × the model, plus the
server's blobs: ≈ 2 × (clients + 2) × the model of free disk) and every body is streamed from its
file, so the bench process never holds a model; no in-memory kernel figure; the limits sized for
models up to ~2 GB are raised (:func:`large_settings`, docs/performance.md says why). The issue's
case, one database at a time: ``--mb 3000 --clients 2 --rounds 1 --database sqlite``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("FLP_ARGON2_TIME_COST", "1")
os.environ.setdefault("FLP_ARGON2_MEMORY_COST_KIB", "64")
os.environ.setdefault("FLP_SECRET_KEY", "bench-secret-key-not-for-production")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402
from update_path_bench import multipart, start_server, stop_server  # noqa: E402

from flplatform import aggregation  # noqa: E402
from flplatform.aggregation import codec  # noqa: E402
from flplatform.migrate import upgrade  # noqa: E402
from flplatform.models.files import TensorSpec  # noqa: E402
from flplatform.models.update_header import canonical_header  # noqa: E402
from tests.conftest import start_postgres  # noqa: E402
from tests.scale.harness import (  # noqa: E402
    admin_headers,
    as_safetensors,
    create_account,
    create_admin,
    scripted,
    training_state,
    upload_model,
)

MB = 1e6


class BenchNet(torch.nn.Module):
    """bench/scale_bench.py's MLP (64 → width → width → 10)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, width)
        self.fc2 = torch.nn.Linear(width, width)
        self.fc3 = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def width_for(mb: float) -> int:
    """Hidden width whose float32 weights come closest to ``mb`` MB (w² + 85w + 10 parameters)."""
    params = mb * MB / 4
    return max(1, round((-85 + math.sqrt(85 * 85 + 4 * (params - 10))) / 2))


# --------------------------------------------------------------------------- the machine


def loopback_bandwidth(total: int = 512 << 20, chunk: int = 1 << 20) -> float:
    """Bytes/s through one TCP connection on 127.0.0.1 (a thread receives and discards)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(chunk)
        with conn:
            while (n := conn.recv_into(buf)) > 0:
                received[0] += n

    thread = threading.Thread(target=sink)
    thread.start()
    payload = b"\0" * chunk
    with socket.create_connection(server.getsockname()) as client:
        started = time.perf_counter()
        for _ in range(total // chunk):
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        thread.join()
        seconds = time.perf_counter() - started
    server.close()
    return received[0] / seconds


def fdatasync_bandwidth(directory: Path, total: int, chunk: int = 8 << 20) -> float:
    """Bytes/s of writing ``total`` bytes to a new file in ``directory`` and ``fdatasync``-ing it
    (what the blob store does per blob), random bytes so no filesystem compresses them."""
    payload = os.urandom(chunk)
    path = directory / "fdatasync-probe"
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(max(1, total // chunk)):
            os.write(fd, payload)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return max(1, total // chunk) * chunk / seconds


def thread_cpu(pid: int) -> tuple[float, float, float]:
    """CPU seconds (user + system) of ``pid``'s main thread (the event loop) and of all its other
    live threads (the worker threads: hashing, spool writes, fsync, the SQLite driver), and the
    system (kernel) part of both together."""
    tick = os.sysconf("SC_CLK_TCK")
    main = rest = kernel = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        kernel += int(fields[12]) / tick
        if task.name == str(pid):
            main += cpu
        else:
            rest += cpu
    return main, rest, kernel


#: /proc/vmstat counters that show the kernel working for memory during a burst: direct reclaim
#: (allocation stalls, pages scanned by the allocating thread), direct compaction, and kswapd.
VMSTAT_KEYS = {
    "allocstall": "direct-reclaim stalls",
    "pgscan_direct": "pages scanned in direct reclaim",
    "compact_stall": "direct-compaction stalls",
    "pgscan_kswapd": "pages scanned by kswapd",
}


def vmstat() -> dict[str, int]:
    """The :data:`VMSTAT_KEYS` counters now (``allocstall`` summed over its zones); empty where
    ``/proc/vmstat`` is missing."""
    counts = dict.fromkeys(VMSTAT_KEYS, 0)
    try:
        lines = Path("/proc/vmstat").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        name, _, value = line.partition(" ")
        key = "allocstall" if name.startswith("allocstall_") else name
        if key in counts:
            counts[key] += int(value)
    return counts


def vm_hwm(pid: int) -> int:
    """Peak resident set of ``pid`` in bytes (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5; needs the same user or root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples the server's resident set (``/proc/<pid>/statm``) every ``interval`` seconds in a
    thread and keeps the peak per phase the driver names (``idle``, ``uploads``, ``close``): where
    the peak happens says which copies are alive then."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid, self.interval = pid, interval
        self.phase = "idle"
        self.peaks: dict[str, int] = {}
        # (RssAnon, RssFile) at each phase's peak: heap copies vs mapped files' pages
        self.split: dict[str, tuple[int, int]] = {}
        # every sample (seconds since start, phase, RssAnon, RssFile) when ``timeline`` is set
        self.timeline: list[tuple[float, str, int, int]] | None = None
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        started = time.perf_counter()
        while not self._stop.wait(self.interval):
            try:
                fields = {
                    k: int(v.split()[0]) * 1024
                    for k, _, v in (line.partition(":") for line in path.read_text().splitlines())
                    if k in ("RssAnon", "RssFile", "RssShmem")
                }
            except (OSError, ValueError, IndexError):
                return
            rss = sum(fields.values())
            phase = self.phase
            if self.timeline is not None:
                self.timeline.append(
                    (time.perf_counter() - started, phase, fields.get("RssAnon", 0), fields.get("RssFile", 0))
                )
            if rss > self.peaks.get(phase, 0):
                self.peaks[phase] = rss
                self.split[phase] = (fields.get("RssAnon", 0), fields.get("RssFile", 0))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def kernel_seconds(updates: list[bytes], repeats: int = 3) -> float:
    """Best of ``repeats``: ``fedavg`` over the updates as bytes already in memory."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        aggregation.fedavg([(u, 10.0 + i) for i, u in enumerate(updates)])
        best = min(best, time.perf_counter() - started)
    return best


# --------------------------------------------------------------------------- models of several GB

#: From this size on (``--mb``) the bench keeps every model on disk and streams the bodies.
LARGE_MB = 1000.0
PIECE = 64 << 20


def of_round(update: bytes, round_: int) -> bytes:
    """``update`` (safetensors bytes, float32 data last) with its last value made round-specific."""
    if round_ == 0:
        return update
    last = struct.unpack_from("<f", update, len(update) - 4)[0]
    return update[:-4] + struct.pack("<f", last + 1e-3 * round_)


def write_update_file(path: Path, state: dict[str, torch.Tensor], delta: float) -> int:
    """``state`` + ``delta`` as a canonical safetensors file (what the server publishes as received),
    written tensor by tensor in pieces: never a second copy of the model in memory."""
    spec = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}
    with open(path, "wb") as out:
        out.write(canonical_header(spec))
        for name in codec.safetensors_order(state):
            flat = state[name].detach().contiguous().reshape(-1)
            step = max(1, PIECE // flat.element_size())
            for start in range(0, flat.numel(), step):
                out.write((flat[start : start + step] + delta).numpy().tobytes())
    return path.stat().st_size


def file_form(fields: dict[str, str], name: str, filename: str, path: Path) -> tuple[Any, dict[str, str]]:
    """A ``multipart/form-data`` body streamed from ``path`` (an async generator) and its headers."""
    boundary = os.urandom(16).hex()
    head = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        + (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
    )
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = len(head) + path.stat().st_size + len(tail)

    async def body() -> Any:
        yield head
        with open(path, "rb") as file:
            while chunk := await asyncio.to_thread(file.read, 4 << 20):
                yield chunk
        yield tail

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(size)}
    return body(), headers


def large_settings(model_bytes: int) -> dict[str, str]:
    """The server's limits raised for a model of ``model_bytes`` (each default is sized for models
    up to ~2 GB; docs/performance.md says why each is needed)."""
    body = int(model_bytes * 1.1) + (64 << 20)
    return {
        "FLP_MAX_UPLOAD_BYTES": str(body),  # 413 past it (default 2 GiB)
        "FLP_MAX_ARCHIVE_UNCOMPRESSED_BYTES": str(body),  # the TorchScript global model's zip (2 GiB)
        # RLIMIT_AS of a sandbox worker (8 GiB): while it loads the archive it holds it twice (as
        # bytes and as torch's own string) plus the module's tensors, and address space beyond that.
        "FLP_SANDBOX_MEMORY_BYTES": str(max(8 << 30, 4 * model_bytes + (3 << 30))),
        "FLP_SANDBOX_MAX_MESSAGE_BYTES": str(max(4 << 30, body)),  # one frame carries the archive
        "FLP_SANDBOX_CHECK_TIMEOUT_SECONDS": "1800",  # loading, checking and hashing 3 GB (20 s)
        "FLP_SANDBOX_CALL_TIMEOUT_SECONDS": "1800",
    }


# --------------------------------------------------------------------------- the close's phases

#: --phases: the server logs at WARNING as usual, plus the close timelines (flplatform.kit.timeline)
PHASES_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(name)s %(levelname)s %(message)s"}},
    "handlers": {
        "out": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    },
    "root": {"level": "WARNING", "handlers": ["out"]},
    "loggers": {"flplatform.timeline": {"level": "DEBUG"}},
}


def read_timelines(log: Path) -> dict[int, list[tuple[str, float]]]:
    """Round -> its close's marks (name, epoch seconds), from the server's ``timeline close`` lines."""
    found: dict[int, list[tuple[str, float]]] = {}
    for line in log.read_text(errors="replace").splitlines():
        head, sep, marks = line.partition(" kind=update ")
        if "timeline close " not in head or not sep:
            continue
        round_ = int(head.rsplit("round=", 1)[1])
        found[round_] = [(str(n), float(t)) for n, t in json.loads(marks)]
    return found


def phase_steps(r: Result, round_: int) -> list[tuple[str, float]]:
    """A round's close as (step name, ms since the step before): from the last upload's response
    (the bench's clock) through the server's marks to the next round's start received."""
    marks = sorted(
        [*r.timelines.get(round_, []), ("bench_round_started_seen", r.next_at[round_])], key=lambda m: m[1]
    )
    steps: list[tuple[str, float]] = []
    seen: dict[str, int] = {}
    previous = r.answered_at[round_]
    for name, at in marks:
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        steps.append((label, 1000 * (at - previous)))
        previous = at
    return steps


#: --phases summary: (phase, the mark it ends at); each phase runs from the previous one's end
PHASES = (
    ("last fold + claim", "folder_lock_taken"),
    ("settle", "settled"),
    ("recompute + finish", "finished"),
    ("archive", "archive_stored"),
    ("state + DB + commit", "committed"),
    ("commit → event seen", "bench_round_started_seen"),
)


def phase_summary(r: Result, round_: int) -> list[float] | None:
    """A round's close in the phases of :data:`PHASES` (ms), from the last upload's response."""
    marks: dict[str, float] = {}
    for name, at in [*r.timelines.get(round_, []), ("bench_round_started_seen", r.next_at[round_])]:
        marks.setdefault(name, at)
    if any(end not in marks for _, end in PHASES):
        return None
    previous, out = r.answered_at[round_], []
    for _, end in PHASES:
        out.append(1000 * (marks[end] - previous))
        previous = marks[end]
    return out


def print_phases(results: list[Result]) -> None:
    print("\nThe close, step by step (ms since the step before; the first since the last upload's response):")
    for r in results:
        if not r.timelines:
            print(f"  {r.database}: no timelines in the server log")
            continue
        rounds = [n for n in range(len(r.answered_at)) if n in r.timelines and n < len(r.next_at)]
        summaries = [v for n in rounds if (v := phase_summary(r, n)) is not None]
        if summaries:
            print(
                f"\n{r.database}, by phase (median ms over {len(summaries)} rounds; each round in brackets):"
            )
            for index, (phase, _) in enumerate(PHASES):
                values = [v[index] for v in summaries]
                each = " ".join(f"{v:.0f}" for v in values)
                print(f"  {phase:22s} {statistics.median(values):5.0f}  [{each}]")
            totals = [sum(v) for v in summaries]
            print(
                f"  {'total':22s} {statistics.median(totals):5.0f}  [{' '.join(f'{v:.0f}' for v in totals)}]"
            )
        per_round = {n: dict(phase_steps(r, n)) for n in rounds}
        order = [name for name, _ in phase_steps(r, rounds[-1])]
        print(f"\n| {r.database} step | median ms | " + " | ".join(f"round {n}" for n in rounds) + " |")
        print("| --- | ---: |" + " ---: |" * len(rounds))
        for name in order:
            values = [per_round[n].get(name) for n in rounds]
            known = [v for v in values if v is not None]
            cells = " | ".join("" if v is None else f"{v:.0f}" for v in values)
            print(f"| {name} | {statistics.median(known):.0f} | {cells} |")


# --------------------------------------------------------------------------- one database


@dataclass
class Result:
    database: str
    update_bytes: int
    bursts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    rss_rounds: int = 0
    rss_setup: int = 0
    hwm_reset: bool = False
    phase_peaks: dict[str, int] = field(default_factory=dict)
    phase_split: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Server CPU seconds per burst: (event loop thread, other threads, kernel part of both)
    burst_cpu: list[tuple[float, float, float]] = field(default_factory=list)
    # The machine's /proc/vmstat memory counters (VMSTAT_KEYS) over each burst
    burst_vmstat: list[dict[str, int]] = field(default_factory=list)
    # --phases: wall-clock times of each round's last response and of its next round's start seen
    answered_at: list[float] = field(default_factory=list)
    next_at: list[float] = field(default_factory=list)
    # --phases: each round's close timeline from the server's log (flplatform.kit.timeline)
    timelines: dict[int, list[tuple[str, float]]] = field(default_factory=dict)


async def drive(url: str, args: argparse.Namespace, pid: int, result: Result) -> list[bytes]:
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients + 10)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as http:
        admin = await admin_headers(http, url)
        actor = await create_account(http, url, admin, "actor", actor=True)
        accounts = [
            await create_account(http, url, admin, f"client-{i:03d}", client=True)
            for i in range(args.clients)
        ]
        if args.large:
            model_id = await upload_large_model(http, url, actor.headers, args.files)
            updates: list[bytes] = []
            result.update_bytes = args.files.updates[0].stat().st_size
        else:
            torch.manual_seed(0)
            net = BenchNet(width_for(args.mb))
            model_id = await upload_model(http, url, actor.headers, scripted(net))
            state = {k: v.detach() for k, v in net.state_dict().items()}
            updates = [
                as_safetensors({k: v + 0.001 * (i + 1) for k, v in state.items()})
                for i in range(args.clients)
            ]
            del net, state
            result.update_bytes = len(updates[0])
        body = {
            "model_id": model_id,
            "target_num_updates": args.rounds,
            "aggregation_method": "FedAvg",
            "clients": [a.id for a in accounts],
            "options": {"skip_model_tests": True},
        }
        r = await http.post(f"{url}/api/trainings/", headers=actor.headers, json=body)
        assert r.status_code == 201, r.text
        training_id = r.json()["training_id"]

        started_rounds: set[int] = set()
        started_wall: dict[int, float] = {}
        tick = asyncio.Event()

        async def watch() -> None:
            """The training's event stream: each round_started, and a tick on every event."""
            async with http.stream(
                "GET", f"{url}/api/trainings/{training_id}/events/", headers=actor.headers, timeout=None
            ) as response:
                kind = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        if kind == "round_started":
                            number = int(json.loads(line[5:])["data"]["round"])
                            started_wall.setdefault(number, time.time())
                            started_rounds.add(number)
                        tick.set()

        async def wait_round(round_: int) -> None:
            while not args.poll_ms:
                if round_ in started_rounds:
                    return
                tick.clear()
                s = await training_state(http, url, actor.headers, training_id)
                if s["state"] in ("C", "E") or round_ in started_rounds:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(tick.wait(), timeout=1.0)
            while True:
                s = await training_state(http, url, actor.headers, training_id)
                if s["state"] == "E":
                    raise RuntimeError(f"training failed: {s['error_reason']}")
                if s["state"] == "C" or (s["round"] == round_ and s["phase"] == "update" and not s["locked"]):
                    return
                await asyncio.sleep((args.poll_ms or 5) / 1000)

        watcher = asyncio.get_running_loop().create_task(watch())
        r = await http.post(f"{url}/api/trainings/{training_id}/start/", headers=actor.headers)
        assert r.status_code == 202, r.text
        await wait_round(0)
        await asyncio.sleep(1.0)  # the start's notifications settle
        result.rss_setup = vm_hwm(pid)  # the set-up's peak (the TorchScript global model's upload)
        result.hwm_reset = reset_hwm(pid)

        async def rounds(sampler: RssSampler) -> None:
            for round_ in range(args.rounds):
                # Each round's updates differ (their last value), as clients' new weights do: bytes
                # uploaded again would be stored as duplicates (their spool files deleted, 15-20 ms
                # of unlink per 68 MB file, during the round's close).
                bodies = [multipart(of_round(u, round_), round_, 10 + i) for i, u in enumerate(updates)]

                async def post(index: int, round_: int, bodies: list[tuple[bytes, str]]) -> None:
                    if args.large:
                        fields = {"round": str(round_), "sample_size": str(10 + index)}
                        content, headers = file_form(
                            fields, "model_file", "u.safetensors", args.files.updates[index]
                        )
                    else:
                        content, headers = bodies[index][0], {"Content-Type": bodies[index][1]}
                    r = await http.post(
                        f"{url}/api/models/{model_id}/",
                        headers={**accounts[index].headers, **headers},
                        content=content,
                    )
                    assert r.status_code == 201, r.text

                sampler.phase = "uploads"
                cpu_before, vm_before = thread_cpu(pid), vmstat()
                started = time.perf_counter()
                await asyncio.gather(*(post(i, round_, bodies) for i in range(args.clients)))
                answered = time.perf_counter()
                result.answered_at.append(time.time())
                cpu_after, vm_after = thread_cpu(pid), vmstat()
                result.burst_cpu.append(
                    (cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1], cpu_after[2] - cpu_before[2])
                )
                result.burst_vmstat.append({k: vm_after[k] - vm_before[k] for k in vm_after})
                sampler.phase = "close"
                del bodies
                await wait_round(round_ + 1)
                result.next_at.append(started_wall.get(round_ + 1, time.time()))
                sampler.phase = "idle"
                result.bursts.append(answered - started)
                result.latencies.append(time.perf_counter() - answered)

        with RssSampler(pid) as sampler:
            if args.timeline:
                sampler.timeline = []
            await rounds(sampler)
        if sampler.timeline is not None:
            lines = [
                f"{t:.4f},{phase},{anon / MB:.1f},{file / MB:.1f}"
                for t, phase, anon, file in sampler.timeline
            ]
            out = Path(args.timeline) / f"timeline-{result.database}.csv"
            out.write_text("seconds,phase,anon_mb,file_mb\n" + "\n".join(lines) + "\n")
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        result.phase_peaks = dict(sampler.peaks)
        result.phase_split = dict(sampler.split)
        result.rss_rounds = vm_hwm(pid)
        final = await training_state(http, url, actor.headers, training_id)
        assert final["state"] == "C" and final["round"] == args.rounds, final
        return updates


@dataclass
class Files:
    """A large run's models on disk: the TorchScript global model and each client's update."""

    model: Path
    updates: list[Path]


def make_files(args: argparse.Namespace, workdir: Path) -> Files:
    torch.manual_seed(0)
    net = BenchNet(width_for(args.mb))
    files = Files(workdir / "global.pt", [workdir / f"update-{i}.safetensors" for i in range(args.clients)])
    torch.jit.save(torch.jit.script(net), str(files.model))
    state = {k: v.detach() for k, v in net.state_dict().items()}
    for i, path in enumerate(files.updates):
        write_update_file(path, state, 0.001 * (i + 1))
    del net, state
    return files


async def upload_large_model(http: httpx.AsyncClient, url: str, headers: dict[str, str], files: Files) -> str:
    fields = {"name": "large", "description": "round bench net", "type": "GLOBAL"}
    content, form_headers = file_form(fields, "model_file", "m.pt", files.model)
    r = await http.post(f"{url}/api/models/", headers={**headers, **form_headers}, content=content)
    assert r.status_code == 201, r.text
    return str(r.json()["model_id"])


def run_database(
    kind: str, db_url: str, args: argparse.Namespace, workdir: Path
) -> tuple[Result, list[bytes]]:
    upgrade(db_url)
    create_admin(db_url)
    blobs = workdir / f"blobs-{kind}"
    os.environ["FLP_BLOB_DIR"] = str(blobs)
    os.environ["FLP_MAX_UPLOAD_BYTES"] = str(int(args.mb * MB * 1.2) + (64 << 20))
    if args.large:
        os.environ.update(large_settings(int(args.mb * MB)))
    # Folding on arrival: on by default (4); --no-fold measures the close-time fold.
    os.environ["FLP_FOLD_MAX_OPEN_ROUNDS"] = "0" if args.no_fold else "4"
    extra: tuple[str, ...] = ()
    if args.phases:
        config = workdir / "log-config.json"
        config.write_text(json.dumps(PHASES_LOG_CONFIG))
        extra = ("--log-config", str(config))
    proc, url = start_server(db_url, workdir / f"server-{kind}.log", extra)
    result = Result(kind, 0)
    try:
        updates = asyncio.run(drive(url, args, proc.pid, result))
    finally:
        stop_server(proc)
        if args.phases:
            result.timelines = read_timelines(workdir / f"server-{kind}.log")
        shutil.rmtree(blobs, ignore_errors=True)
        if os.environ.get("ROUND_BENCH_LOG"):
            print(
                (workdir / f"server-{kind}.log").read_text()[-int(os.environ["ROUND_BENCH_LOG"]) :],
                file=sys.stderr,
            )
    return result, updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mb", type=float, default=68.0, help="model (and update) size in MB of float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", default="sqlite,postgresql", help="sqlite, postgresql or both")
    parser.add_argument("--no-fold", action="store_true", help="FLP_FOLD_MAX_OPEN_ROUNDS=0 (fold at close)")
    parser.add_argument(
        "--large",
        action="store_true",
        help=f"models on disk, bodies streamed from files, limits raised (automatic from {LARGE_MB:.0f} MB)",
    )
    parser.add_argument(
        "--workdir", default=None, help="where the run's files go (default: a temporary directory)"
    )
    parser.add_argument(
        "--poll-ms", type=float, default=0, help="poll the training every N ms instead of its event stream"
    )
    parser.add_argument(
        "--timeline",
        default=None,
        help="write every RSS sample (every 5 ms: seconds, phase, anonymous MB, file-backed MB) to "
        "DIR/timeline-<database>.csv",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="log the close's timeline in the server (flplatform.kit.timeline) and print it step by step",
    )
    args = parser.parse_args()
    args.large = args.large or args.mb >= LARGE_MB
    base = Path(tempfile.mkdtemp(prefix="flp-round-bench-", dir=args.workdir))
    base.chmod(0o755)
    if args.large:
        args.files = make_files(args, base)
    load_before = os.getloadavg()
    loopback = loopback_bandwidth()
    fsync = fdatasync_bandwidth(base, max(256 << 20, int(args.mb * MB)))
    results: list[Result] = []
    kernel = math.nan
    cluster = None
    try:
        for kind in args.database.split(","):
            if kind == "sqlite":
                db_url = f"sqlite+aiosqlite:///{base}/round-bench.db"
            else:
                if cluster is None:
                    (base / "pg").mkdir(mode=0o755)
                    cluster = start_postgres(base / "pg")
                db_url = cluster.create_database("flp_round_bench")
            result, updates = run_database(kind, db_url, args, base)
            results.append(result)
            if math.isnan(kernel) and updates:  # not for --large (the updates are on disk)
                kernel = kernel_seconds(updates)
            del updates
            print(f"  {kind} done", file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    size = results[0].update_bytes if results else 0
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    print(
        f"{args.clients} clients × {size / MB:.1f} MB update, {args.rounds} rounds, FedAvg"
        f"{' folded at close only' if args.no_fold else ''}; load average before {load_before[0]:.1f}, "
        f"after {load_after[0]:.1f}; loopback {loopback / MB:.0f} MB/s, fdatasync {fsync / MB:.0f} MB/s; "
        f"fedavg kernel over the same {args.clients} updates in memory {1000 * kernel:.0f} ms\n"
    )
    print(
        "| database | upload burst MB/s (median / best) | last upload → next round s (median / each) "
        "| server peak RSS MB, rounds (× model) | sampled peak MB: uploads / close / idle | set-up MB "
        "| server CPU s per burst: event loop + threads (kernel) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        mbps = [args.clients * r.update_bytes / s / MB for s in r.bursts]
        each = " ".join(f"{s:.2f}" for s in r.latencies)
        rounds_rss = (
            f"{r.rss_rounds / MB:.0f} ({r.rss_rounds / r.update_bytes:.1f}×)" if r.hwm_reset else "n/a"
        )
        phases = " / ".join(f"{r.phase_peaks.get(p, 0) / MB:.0f}" for p in ("uploads", "close", "idle"))
        cpu = " · ".join(f"{m:.2f} + {t:.2f} ({k:.2f})" for m, t, k in r.burst_cpu)
        print(
            f"| {r.database} | {statistics.median(mbps):.0f} / {max(mbps):.0f} "
            f"| {statistics.median(r.latencies):.2f} / {each} | {rounds_rss} | {phases} | {r.rss_setup / MB:.0f} "
            f"| {cpu} |"
        )
    print("\nAt each phase's sampled peak, anonymous (heap) + file-backed (mapped blobs) MB:")
    for r in results:
        print(
            f"  {r.database}: "
            + ", ".join(
                f"{p} {r.phase_split[p][0] / MB:.0f} + {r.phase_split[p][1] / MB:.0f}"
                for p in ("uploads", "close", "idle")
                if p in r.phase_split
            )
        )
    print("\nThe machine's memory work per burst (/proc/vmstat; kernel time above with none of it points")
    print("at page-cache page faults, e.g. a balloon's reported pages, rather than reclaim):")
    for r in results:
        for key, label in VMSTAT_KEYS.items():
            print(f"  {r.database}: {label}: " + " · ".join(str(v.get(key, 0)) for v in r.burst_vmstat))
    if args.phases:
        print_phases(results)
    print(
        f"\nTargets (issue 21): upload ≥ 300 MB/s or ≥ {0.5 * fsync / MB:.0f} MB/s (50 % of fdatasync); "
        f"last upload → next round ≤ 0.5 s; peak RSS ≤ {(3 * size + 400 * MB) / MB:.0f} MB (3× model + 400 MB)"
    )


if __name__ == "__main__":
    main()
