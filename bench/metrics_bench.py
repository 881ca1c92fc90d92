"""What the Prometheus instrumentation costs (``flplatform.kit.metrics``): one unlabelled counter
increment (the broker's per-message path), one HTTP observation (per request), and a whole small
ASGI request with and without the ``HTTPMetrics`` middleware; in this process's memory and in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a fresh subprocess each, since prometheus-client
picks the mode when imported). Prints a table, asserts nothing about time::

    .venv/bin/python bench/metrics_bench.py        # ~1 minute

Each figure is the best of 5 repeats (the machine is shared; the load column says how busy).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import timeit

CALLS = 100_000
REQUESTS = 2_000


def _measure() -> dict[str, float]:
    import httpx
    from fastapi import FastAPI

    from flplatform.kit import metrics
    from flplatform.kit.prometheus import HTTPMetrics, multiprocess_mode

    def per_call(fn: object, number: int = CALLS) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number  # type: ignore[arg-type]

    def asgi(instrumented: bool) -> float:
        app = FastAPI()

        @app.get("/items/{item_id}")
        async def item(item_id: int) -> dict[str, int]:
            return {"id": item_id}

        if instrumented:
            app.add_middleware(HTTPMetrics)

        async def run() -> float:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                best = float("inf")
                for _ in range(5):
                    start = asyncio.get_running_loop().time()
                    for i in range(REQUESTS):
                        await client.get(f"/items/{i}")
                    best = min(best, (asyncio.get_running_loop().time() - start) / REQUESTS)
                return best

        return asyncio.run(run())

    return {
        "multiprocess": float(multiprocess_mode()),
        "counter_inc_ns": per_call(metrics.BROKER_PUBLISHED.inc) * 1e9,
        "observe_http_us": per_call(lambda: metrics.observe_http("GET", "/items/{item_id}", 200, 0.01)) * 1e6,
        "request_plain_us": asgi(False) * 1e6,
        "request_instrumented_us": asgi(True) * 1e6,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    if "--child" in sys.argv:
        print(json.dumps(_measure()))
        return
    rows = []
    for mode in ("memory", "multiprocess"):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory() as directory:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = directory
            out = subprocess.run(
                [sys.executable, __file__, "--child"], env=env, check=True, capture_output=True
            )
        rows.append((mode, json.loads(out.stdout)))
    print("| mode | counter.inc() | observe_http() | small request | with HTTPMetrics | difference | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in rows:
        diff = r["request_instrumented_us"] - r["request_plain_us"]
        print(
            f"| {mode} | {r['counter_inc_ns']:.0f} ns | {r['observe_http_us']:.1f} µs | "
            f"{r['request_plain_us']:.0f} µs | {r['request_instrumented_us']:.0f} µs | {diff:+.0f} µs | {r['load']:.1f} |"
        )


if __name__ == "__main__":
    main()
