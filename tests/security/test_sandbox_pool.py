"""The sandbox pool's async path: calls run on the caller's event loop, at most ``workers`` at
once (the rest wait, no extra process), and a caller that gives up does not cost a worker."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from flplatform.sandbox import client
from flplatform.sandbox.runner import SandboxPool, SandboxSettings, set_pool
from tests.inference.conftest import DropoutMLP, torchscript_bytes

OPTIONS = {"samples": 10, "softmax": False, "seed": None, "min_var": 1e-30, "scale": 1.0}


class Slow(nn.Module):
    """Ordinary ops for a while (a few hundred ms), then an answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.eye(256) * 0.5
        y = torch.ones(256, 256)
        for _ in range(3000):
            y = torch.tanh(y @ w)
        return x + y[0, 0]


@pytest.fixture
async def pool():
    pool = SandboxPool(SandboxSettings(workers=1, call_timeout_seconds=60))
    previous = set_pool(pool)
    await asyncio.to_thread(pool.fill)
    yield pool
    set_pool(previous)
    pool.close()


async def run(key: str, data: bytes, x: torch.Tensor) -> torch.Tensor:
    async def load() -> bytes:
        return data

    samples, _ = await client.predict(
        tree={"key": key}, refs={key: client.ModuleRef(key, load)}, preprocessing=None, inputs=x,
        method="NONE", options=OPTIONS, input_shape=None, max_batch=64, expected_samples=1,
    )  # fmt: skip
    return samples


async def test_calls_beyond_the_workers_wait_instead_of_starting_processes(pool):
    honest = torchscript_bytes(DropoutMLP())
    x = torch.randn(2, 4)
    results = await asyncio.gather(*(run("honest", honest, x) for _ in range(4)))
    assert all(r.shape == (1, 2, 3) for r in results)
    assert all(torch.equal(r, results[0]) for r in results)
    assert pool.started == 1


async def test_a_cancelled_call_finishes_in_the_background_and_keeps_its_worker(pool):
    slow = torchscript_bytes(Slow())
    call = asyncio.create_task(run("slow", slow, torch.zeros(1, 3)))
    await asyncio.sleep(0.2)  # the worker is loading or running the module now
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    honest = torchscript_bytes(DropoutMLP())
    samples = await run("honest", honest, torch.randn(1, 4))  # waits for the slow call's worker
    assert samples.shape == (1, 1, 3)
    assert pool.started == 1  # not killed and replaced
