"""DASF broker benchmark: producer → broker → consumer messages per second with acks, latency,
and a demessaging request round trip. Prints a table; asserts nothing.

    .venv/bin/python bench/broker_bench.py                 # SQLite, one uvicorn process
    .venv/bin/python bench/broker_bench.py --postgres      # throwaway PostgreSQL, 2 uvicorn processes

The broker runs as real uvicorn subprocesses (``flplatform.app:create_app``); the clients run in
this process with the ``websockets`` library (compression off, as DASF clients do). With
``--postgres`` each worker is its own process on its own port: the producer talks to the first,
the consumers to the second, so every message crosses processes by LISTEN/NOTIFY. Latency is
from the producer's send to the first consumer's receive (one clock). "Lost" counts messages
the consumers never received. Run it un-niced on an otherwise quiet machine; the load average
before and after is printed with the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flplatform.orm.broker import StorePolicy  # noqa: E402
from flplatform.serving import uvicorn_ws_cli_args  # noqa: E402
from tests.conftest import free_port, start_postgres, wait_for_port  # noqa: E402


def _connect(url: str) -> Any:
    return websockets.connect(url, compression=None, max_size=None, open_timeout=20)


async def _create_topics(url: str, topics: dict[str, StorePolicy]) -> None:
    from flplatform.db import create_engine, create_sessionmaker
    from flplatform.orm.broker import BrokerTopic

    engine = create_engine(url)
    async with create_sessionmaker(engine)() as session:
        for slug, policy in topics.items():
            session.add(
                BrokerTopic(
                    slug=slug,
                    is_public=True,
                    anonymous_can_consume=True,
                    store_messages=policy,
                    supports_dasf=slug.startswith("dasf"),
                    api_info={},
                )
            )
        await session.commit()
    await engine.dispose()


async def _scenario(
    ws_url: str, slug: str, total: int, consumers: int, pipelined: bool, consumer_url: str | None = None
) -> dict[str, Any]:
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    counts = [0] * consumers
    done = asyncio.Event()

    async def consume(index: int, ws: Any) -> None:
        while counts[index] < total:
            message = json.loads(await ws.recv())
            if "context" not in message:
                continue  # broker-made api_info / ping
            counts[index] += 1
            if index == 0:
                latencies.append(time.perf_counter() - sent_at[message["context"]])
            await ws.send(json.dumps({"messageId": message["messageId"]}))
        if all(c >= total for c in counts):
            done.set()

    sockets = [
        await _connect(f"{consumer_url or ws_url}/{slug}/bench-{i}").__aenter__() for i in range(consumers)
    ]
    readers = [asyncio.create_task(consume(i, ws)) for i, ws in enumerate(sockets)]
    await asyncio.sleep(0.3)  # every consumer socket is registered before the first publish
    producer = await _connect(f"{ws_url}/{slug}").__aenter__()
    payload = "eyJmdW5jX25hbWUiOiJhZGQiLCJhIjoyfQ=="
    started = time.perf_counter()
    acks = 0
    if pipelined:

        async def read_acks() -> None:
            nonlocal acks
            while acks < total:
                await producer.recv()
                acks += 1

        ack_reader = asyncio.create_task(read_acks())
        for i in range(total):
            sent_at[i] = time.perf_counter()
            await producer.send(
                json.dumps(
                    {
                        "properties": {"requestContext": i, "messageType": "request"},
                        "payload": payload,
                        "context": i,
                    }
                )
            )
        await ack_reader
    else:
        for i in range(total):
            sent_at[i] = time.perf_counter()
            await producer.send(
                json.dumps(
                    {
                        "properties": {"requestContext": i, "messageType": "request"},
                        "payload": payload,
                        "context": i,
                    }
                )
            )
            await producer.recv()
            acks += 1
    acked = time.perf_counter()
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        pass
    finished = time.perf_counter()
    for task in readers:
        task.cancel()
    await producer.close()
    for ws in sockets:
        await ws.close()
    latencies.sort()
    return {
        "acks_per_s": total / (acked - started),
        "delivered_per_s": total * consumers / (finished - started),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
        "lost": total * consumers - sum(counts),
    }


def _demessaging_round_trip(ws_url: str, topic: str, calls: int) -> tuple[float, float]:
    from demessaging.backend.module import BackendModule
    from demessaging.config import WebsocketURLConfig

    config = WebsocketURLConfig(topic=topic, websocket_url=ws_url)
    model = BackendModule.create_model("tests.broker.dasf_module", members=["add"], messaging_config=config)
    model.send_request({"func_name": "add", "a": 1})  # connect + warm up
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        assert model.send_request({"func_name": "add", "a": i, "b": 1}).root == i + 1  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t0)
    producer = config._producer
    if producer is not None:
        producer.out_app.close()
        producer.disconnect()
    times.sort()
    return 1000 * statistics.median(times), 1000 * times[int(len(times) * 0.9) - 1]


def _start_servers(url: str, workers: int) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    env = dict(
        os.environ,
        FLP_DATABASE_URL=url,
        FLP_SECRET_KEY="bench-secret",
        FLP_LOG_LEVEL="WARNING",
        FLP_BROKER_BACKGROUND_TASKS="true",
    )
    procs, urls = [], []
    for _ in range(workers):
        port = free_port()
        cmd = [
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
            "--ws-per-message-deflate",
            "false",
        ]
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(ROOT)))
        urls.append(f"ws://127.0.0.1:{port}/ws")
    for ws_url in urls:
        wait_for_port(int(ws_url.rsplit(":", 1)[1].split("/")[0]), 60)
    return procs, urls


async def _wait_for_api_info(ws_url: str, topic: str, timeout: float = 60) -> None:
    """The backend is ready once it answered the broker's api_info request."""
    import httpx

    http_url = ws_url.replace("ws://", "http://").removesuffix("/ws")
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=http_url, timeout=5) as http:
        while time.monotonic() < deadline:
            response = await http.get(f"/api/broker/topics/{topic}/")
            if response.status_code == 200 and response.json().get("api_info"):
                return
            await asyncio.sleep(0.2)
    raise TimeoutError("the demessaging backend did not connect")


async def _run(args: argparse.Namespace, url: str) -> None:
    load_before = os.getloadavg()
    topics = {
        f"{policy.value}_{i}": policy
        for policy in (StorePolicy.CACHE, StorePolicy.DISABLED)
        for i in range(8)
    }
    topics["dasf_rt"] = StorePolicy.CACHE
    await _create_topics(url, topics)
    servers, urls = _start_servers(url, args.workers)
    producer_url, consumer_url = urls[0], urls[1 % len(urls)]
    rows = []
    p50 = p90 = float("nan")
    try:
        used: dict[StorePolicy, int] = {StorePolicy.CACHE: 0, StorePolicy.DISABLED: 0}
        for policy in (StorePolicy.CACHE, StorePolicy.DISABLED):
            for consumers in (1, 10):
                for pipelined in (False, True):
                    slug = f"{policy.value}_{used[policy]}"
                    used[policy] += 1
                    total = args.messages if consumers == 1 else args.messages // 2
                    result = await _scenario(producer_url, slug, total, consumers, pipelined, consumer_url)
                    rows.append(
                        (policy.value, consumers, "pipelined" if pipelined else "sequential", total, result)
                    )
                    print(
                        f"{policy.value:8} consumers={consumers:2} {rows[-1][2]:10} n={total:5} "
                        f"acks/s={result['acks_per_s']:8.0f} delivered/s={result['delivered_per_s']:8.0f} "
                        f"p50={result['p50_ms']:7.1f}ms p99={result['p99_ms']:7.1f}ms lost={result['lost']}",
                        flush=True,
                    )
        backend = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests/broker/dasf_module.py"),
                "-t",
                "dasf_rt",
                "--websocket-url",
                consumer_url,
                "listen",
            ],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await _wait_for_api_info(consumer_url, "dasf_rt")
            p50, p90 = await asyncio.to_thread(
                _demessaging_round_trip, producer_url, "dasf_rt", args.rpc_calls
            )
        finally:
            backend.terminate()
            backend.wait(10)
        print(
            f"demessaging add() round trip: p50={p50:.1f} ms p90={p90:.1f} ms ({args.rpc_calls} sequential calls)"
        )
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(20)
    load_after = os.getloadavg()
    db = f"PostgreSQL, {args.workers} uvicorn processes" if args.postgres else "SQLite, 1 uvicorn process"
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load average "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after"
    )
    print(
        f"\n| {db}: policy | consumers | mode | messages | producer acks/s | deliveries/s | p50 ms | p99 ms | lost |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for policy, consumers, mode, total, r in rows:
        print(
            f"| {policy} | {consumers} | {mode} | {total} | {r['acks_per_s']:,.0f} | {r['delivered_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['lost']} |"
        )
    print(
        f"| demessaging `add` round trip | 1 backend | sequential | {args.rpc_calls} | | | {p50:.1f} | p90 {p90:.1f} | 0 |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=2000, help="messages per 1-consumer scenario")
    parser.add_argument("--rpc-calls", type=int, default=40)
    parser.add_argument(
        "--postgres", action="store_true", help="throwaway PostgreSQL cluster instead of SQLite"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="uvicorn processes (default 1 on SQLite, 2 on PostgreSQL; SQLite needs 1)",
    )
    args = parser.parse_args()
    if args.workers is None:
        args.workers = 2 if args.postgres else 1
    from flplatform.migrate import upgrade

    tmp = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    cluster = None
    if args.postgres:
        tmp.chmod(0o755)
        cluster = start_postgres(tmp)
        url = cluster.create_database("bench")
    else:
        url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    try:
        upgrade(url)
        asyncio.run(_run(args, url))
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
