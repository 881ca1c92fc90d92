"""Model sandbox benchmark: inference latency of the former in-process path (TorchScript loaded
in the server, ``predict`` in a thread) against the sandbox (module cached in a warm
worker, JSON + safetensors frames over pipes), for a small CNN and an MLP at batch 1 and 64.

    .venv/bin/python bench/sandbox_bench.py [--repeat 50]

Prints a table (medians, ms); results go in docs/performance.md ("Model sandbox"). Never
asserts on time. The in-process path exists here only as the baseline: the server no longer has it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from flplatform.sandbox import client
from flplatform.sandbox.runner import SandboxPool, SandboxSettings, set_pool
from flplatform.uncertainty import Method, SamplingOptions, predict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import SmallCNN  # noqa: E402  (the MNIST-sized CNN of bench/inference.py)


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


async def block_medians(first, second, repeat: int, blocks: int = 4) -> tuple[float, float]:
    """Median ms of each call, measured in alternating blocks: load from other processes on a
    shared machine hits both alike, and one path's idle torch threads (which spin for a while
    after work) do not steal the CPU from the other's next call."""
    await first()
    await second()  # warm-up (and, for the sandbox, the module's first load)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(blocks):
        for call, samples in ((first, times[0]), (second, times[1])):
            await asyncio.sleep(0.3)  # let the other path's threads go idle
            for _ in range(repeat // blocks):
                start = time.perf_counter()
                await call()
                samples.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000


async def main(repeat: int, threads: int) -> None:
    pool = SandboxPool(SandboxSettings(workers=1, threads=threads))
    set_pool(pool)
    await asyncio.to_thread(pool.fill)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} in-process, {threads or 'default'} per worker, "
          f"repeat {repeat} (median ms)")  # fmt: skip
    print(f"{'model':8} {'batch':>5} {'in-process':>11} {'sandbox':>9} {'ratio':>6}")
    for name, module, shape in (("CNN", SmallCNN(), (1, 28, 28)), ("MLP", MLP(), (64,))):
        data = archive(module)
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
                    options={"samples": 10, "softmax": False, "seed": None, "min_var": 1e-30, "scale": 1.0},
                    input_shape=None, max_batch=1024, expected_samples=1,
                )  # fmt: skip

            before, after = await block_medians(in_process, sandboxed, repeat)
            print(f"{name:8} {batch:>5} {before:>11.2f} {after:>9.2f} {after / before:>6.2f}")
    pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument(
        "--threads", type=int, default=SandboxSettings().threads, help="torch threads per worker"
    )
    args = parser.parse_args()
    asyncio.run(main(args.repeat, args.threads))
