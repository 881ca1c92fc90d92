"""Memory pinned by broker consumers that never read (issue 14, docs/security.md "Broker queues").

An anonymous public topic, N consumer sockets that stop reading after one frame, and a producer
publishing ``--messages`` envelopes of ``--size`` bytes. Prints the server process's peak RSS
growth and the bytes held by the consumer queues (the issue measured 1,000 × 1 MiB into one
idle consumer: RSS 366 → 1,550 MiB before the byte bounds).

    .venv/bin/python bench/broker_idle_consumer.py --messages 1000 --size 1048576 --consumers 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile

import uvicorn
import websockets


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("FLP_SECRET_KEY", "bench-secret")
    from flplatform.app import create_app
    from flplatform.broker.config import BrokerConfig
    from flplatform.migrate import upgrade
    from flplatform.orm.broker import BrokerTopic
    from flplatform.settings import Settings

    url = f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/bench.db"
    upgrade(url)
    app = create_app(Settings(database_url=url, log_level="WARNING"))
    app.state.broker_config = BrokerConfig(consumer_stall_seconds=args.stall, background_tasks=False)
    async with app.router.lifespan_context(app):
        async with app.state.sessionmaker() as session:
            session.add(
                BrokerTopic(
                    slug="idle", is_public=True, anonymous_can_consume=True, supports_dasf=False, api_info={}
                )
            )
            await session.commit()
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=args.port,
                lifespan="off",
                log_level="warning",
                ws_max_size=64 * 1024**2,
            )
        )
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        base = f"ws://127.0.0.1:{args.port}/ws"
        before = peak = rss_mib()
        consumers = [
            await websockets.connect(f"{base}/idle/c{i}", max_size=None, max_queue=1, compression=None)
            for i in range(args.consumers)
        ]
        budget = getattr(app.state.broker, "queue_budget", None)
        held = 0
        async with websockets.connect(f"{base}/idle", max_size=None, compression=None) as producer:
            body = json.dumps({"payload": "A" * args.size})
            for _ in range(args.messages):
                await producer.send(body)
                await producer.recv()
                peak, held = max(peak, rss_mib()), max(held, budget.total if budget else 0)
        print(
            f"{args.messages} × {args.size} B to {args.consumers} idle consumer(s): RSS {before:.0f} → peak "
            f"{peak:.0f} MiB (+{peak - before:.0f}); consumer queues held at most {held / 1024**2:.1f} MiB; "
            f"stalled consumers disconnected: {app.state.broker.stats['stalled']}"
        )
        for ws in consumers:
            await ws.close()
        server.should_exit = True
        await task


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024**2)
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--stall", type=float, default=5.0, help="consumer_stall_seconds (60 in production)")
    parser.add_argument("--port", type=int, default=18765)
    asyncio.run(main(parser.parse_args()))
