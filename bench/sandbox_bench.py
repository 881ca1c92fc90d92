"""Model sandbox benchmark: inference latency of the former in-process path (TorchScript loaded
in the server, ``predict`` in a thread) against the sandbox (module cached in a warm worker,
tensors as raw bytes over pipes), for a small CNN and an MLP at batch 1 and 64, first as bare
calls, then end to end (``POST /api/inference/`` through the real app, ASGI, SQLite).

    .venv/bin/python bench/sandbox_bench.py [--repeat 200] [--http-repeat 100]

The two paths are measured in alternating blocks (load from other processes on a shared machine
hits both alike); each row gives the median and the 10th–90th percentiles of each path, the
ratio of the medians, the range of that ratio over the blocks (how much it moves with the
machine's load) and its 95 % confidence interval (a two-stage bootstrap: block pairs drawn with
replacement, then calls within each block, so both the drift between blocks and the spread inside
them widen it). A target such as "within 1.5x" is met only where the interval's upper end is below
it, not where one run's median ratio happens to be. Results go in docs/performance.md ("Model sandbox"). Never asserts on time. The
in-process path exists here only as the baseline: the server no longer has it. End to end, the
baseline is the same app with the sandbox call replaced by what the server did before issue 14
(the module loaded once with ``torch.jit.load`` in the server, ``predict`` in a thread).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from flplatform.sandbox import client
from flplatform.sandbox.runner import SandboxPool, SandboxSettings, set_pool
from flplatform.uncertainty import Method, SamplingOptions, predict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import SmallCNN  # noqa: E402  (the MNIST-sized CNN of bench/inference.py)

Call = Callable[[], Awaitable[Any]]
OPTIONS = {"samples": 10, "softmax": False, "seed": None, "min_var": 1e-30, "scale": 1.0}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def archive(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def interleaved(before: Call, after: Call, repeat: int, blocks: int = 16) -> dict[str, Any]:
    """Per-call ms of both paths in alternating blocks, with a pause before each block so that
    one path's idle threads do not take the CPU from the other's next call."""
    await before()
    await after()  # warm-up (and, for the sandbox, the module's first load)
    times: tuple[list[float], list[float]] = ([], [])
    block_ratios = []
    paired_blocks: list[tuple[list[float], list[float]]] = []
    for _ in range(blocks):
        medians = []
        pair: list[list[float]] = []
        for call, samples in ((before, times[0]), (after, times[1])):
            await asyncio.sleep(0.2)
            block = []
            for _ in range(max(1, repeat // blocks)):
                start = time.perf_counter()
                await call()
                block.append((time.perf_counter() - start) * 1000)
            samples.extend(block)
            pair.append(block)
            medians.append(statistics.median(block))
        block_ratios.append(medians[1] / medians[0])
        paired_blocks.append((pair[0], pair[1]))
    return {
        "before": times[0],
        "after": times[1],
        "ratio": statistics.median(times[1]) / statistics.median(times[0]),
        "block_ratios": (min(block_ratios), max(block_ratios)),
        "interval": bootstrap_ratio_interval(paired_blocks),
    }


def bootstrap_ratio_interval(
    paired_blocks: list[tuple[list[float], list[float]]], resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of median(after) / median(before) by a two-stage bootstrap over the blocks."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        before: list[float] = []
        after: list[float] = []
        for _ in paired_blocks:
            block_before, block_after = rng.choice(paired_blocks)
            before.extend(rng.choices(block_before, k=len(block_before)))
            after.extend(rng.choices(block_after, k=len(block_after)))
        ratios.append(statistics.median(after) / statistics.median(before))
    return percentile(ratios, 0.025), percentile(ratios, 0.975)


def row(label: str, batch: int, result: dict[str, Any]) -> str:
    def cell(values: list[float]) -> str:
        return (
            f"{statistics.median(values):7.2f} ({percentile(values, 0.1):.2f}–{percentile(values, 0.9):.2f})"
        )

    low, high = result["block_ratios"]
    interval_low, interval_high = result["interval"]
    return (
        f"| {label} | {batch} | {cell(result['before'])} | {cell(result['after'])} | "
        f"{result['ratio']:.2f} | {interval_low:.2f}–{interval_high:.2f} | {low:.2f}–{high:.2f} |"
    )


HEADER = (
    "| model | batch | in-process ms, median (p10–p90) | sandbox ms, median (p10–p90) | ratio of medians "
    "| 95 % interval | ratio per block |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
)
MODELS = (("SmallCNN", SmallCNN, (1, 28, 28)), ("MLP", MLP, (64,)))


async def bench_calls(repeat: int) -> None:
    print("\nBare calls (method NONE): predict() in a thread vs client.predict() through the sandbox")
    print(HEADER)
    for name, factory, shape in MODELS:
        data = archive(factory())
        loaded = torch.jit.load(io.BytesIO(data)).eval()  # the former in-process path (baseline only)

        async def load(data: bytes = data) -> bytes:
            return data

        refs = {name: client.ModuleRef(name, load)}
        for batch in (1, 64):
            x = torch.randn(batch, *shape)

            async def in_process(loaded: nn.Module = loaded, x: torch.Tensor = x) -> None:
                await asyncio.to_thread(predict, Method.NONE, loaded, x, SamplingOptions())

            async def sandboxed(name: str = name, refs: dict = refs, x: torch.Tensor = x) -> None:
                await client.predict(
                    tree={"key": name}, refs=refs, preprocessing=None, inputs=x, method="NONE",
                    options=OPTIONS, input_shape=None, max_batch=1024, expected_samples=1,
                )  # fmt: skip

            print(row(name, batch, await interleaved(in_process, sandboxed, repeat)), flush=True)


def in_process_predict() -> Callable[..., Awaitable[tuple[torch.Tensor, int | None]]]:
    """What the server did before the sandbox, with :func:`client.predict`'s signature: the
    module loaded once in the server process, ``predict`` in a worker thread (single models)."""
    loaded: dict[str, nn.Module] = {}

    async def run(*, tree: dict, refs: dict, inputs: torch.Tensor, method: str, options: dict,
                  **_: Any) -> tuple[torch.Tensor, int | None]:  # fmt: skip
        key = tree["key"]
        if key not in loaded:
            loaded[key] = torch.jit.load(io.BytesIO(await refs[key].load())).eval()
        prediction = await asyncio.to_thread(
            predict, Method(method), loaded[key], inputs, SamplingOptions(**options)
        )
        return prediction.samples, prediction.dropout_layers

    return run


async def bench_http(repeat: int) -> None:
    import httpx

    from flplatform.app import create_app
    from flplatform.migrate import upgrade
    from flplatform.settings import Settings

    print("\nEnd to end: POST /api/inference/ (JSON input, method NONE; ASGI in-process, SQLite)")
    print(HEADER)
    directory = tempfile.mkdtemp(prefix="flp-sandbox-bench-")
    url = f"sqlite+aiosqlite:///{directory}/bench.db"
    await asyncio.to_thread(upgrade, url)
    settings = Settings(database_url=url, log_level="WARNING", admin_username="bench",
                        admin_password="bench-password-123", admin_email="bench@example.org")  # fmt: skip
    app = create_app(settings)
    sandbox_predict, baseline = client.predict, in_process_predict()
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", timeout=120
        ) as http,
    ):
        me = await http.get("/api/users/myself/", auth=("bench", "bench-password-123"))
        headers = {"Authorization": f"Token {me.json()['token']}"}
        for name, factory, shape in MODELS:
            uploaded = await http.post(
                "/api/models/", headers=headers, data={"name": name, "description": "", "type": "GLOBAL"},
                files={"model_file": ("m.pt", archive(factory()))},
            )  # fmt: skip
            assert uploaded.status_code == 201, uploaded.text
            model_id = uploaded.json()["model_id"]
            for batch in (1, 64):
                body = {"model_id": model_id, "model_input": torch.randn(batch, *shape).tolist()}

                async def post(body: dict = body) -> None:
                    response = await http.post("/api/inference/", headers=headers, json=body)
                    assert response.status_code == 200, response.text

                async def before() -> None:
                    client.predict = baseline  # type: ignore[assignment]  (the pre-sandbox path)
                    try:
                        await post()
                    finally:
                        client.predict = sandbox_predict

                print(row(name, batch, await interleaved(before, post, repeat)), flush=True)


async def main(repeat: int, http_repeat: int, threads: int) -> None:
    pool = SandboxPool(SandboxSettings(workers=1, threads=threads))
    set_pool(pool)
    await asyncio.to_thread(pool.fill)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} "
        f"in-process, {threads or 'default'} per worker, 1 worker; load average {load[0]:.1f} at the start"
    )
    await bench_calls(repeat)
    if http_repeat:
        await bench_http(http_repeat)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="bare calls per path and row")
    parser.add_argument("--http-repeat", type=int, default=100, help="requests per path and row (0: skip)")
    parser.add_argument(
        "--threads", type=int, default=SandboxSettings().threads, help="torch threads per worker (0: default)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.repeat, args.http_repeat, args.threads))
