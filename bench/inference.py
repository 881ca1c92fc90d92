"""Inference benchmark: the uncertainty methods in-process, module loading vs the LRU cache,
and end-to-end HTTP latency (ASGI, SQLite) for JSON and .npy inputs.

    .venv/bin/python bench/inference.py [--batch 64] [--repeat 5]

Prints tables; results and the machine they came from go in docs/performance.md ("Inference").
Never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

os.environ.setdefault("FLP_SECRET_KEY", "bench-secret")
os.environ.setdefault("FLP_ARGON2_TIME_COST", "1")
os.environ.setdefault("FLP_ARGON2_MEMORY_COST_KIB", "64")

from flplatform.uncertainty import Ensemble, Method, SamplingOptions, predict  # noqa: E402


class SmallCNN(nn.Module):
    """An MNIST-sized CNN with dropout (≈ 0.2 M parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = self.drop(torch.flatten(x, 1))
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def scripted(seed: int) -> tuple[torch.jit.ScriptModule, bytes]:
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(SmallCNN().eval()), buffer)
    data = buffer.getvalue()
    return torch.jit.load(io.BytesIO(data)).eval(), data


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def bench_methods(batch: int, repeat: int) -> None:
    module, data = scripted(0)
    members = [scripted(seed)[0] for seed in range(5)]
    first = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    second = first**2 + 1e-4
    x = torch.randn(batch, 1, 28, 28)
    params = first.numel()
    print(f"\nSmallCNN: {params} parameters, TorchScript {len(data) / 1e6:.2f} MB, batch {batch}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'method':<28}{'median ms':>12}{'ms / pass':>12}")
    cases = [
        ("NONE", lambda: predict(Method.NONE, module, x, SamplingOptions()), 1),
        ("ENSEMBLE (5 members)", lambda: predict(Method.ENSEMBLE, Ensemble(members), x, SamplingOptions()), 5),
        ("MC_DROPOUT N=10", lambda: predict(Method.MC_DROPOUT, module, x, SamplingOptions(samples=10)), 10),
        ("MC_DROPOUT N=10 softmax", lambda: predict(Method.MC_DROPOUT, module, x, SamplingOptions(samples=10, softmax=True)), 10),
        ("SWAG N=10", lambda: predict(Method.SWAG, module, x, SamplingOptions(samples=10), moments=(first, second)), 10),
        ("SWAG N=30", lambda: predict(Method.SWAG, module, x, SamplingOptions(samples=30), moments=(first, second)), 30),
    ]  # fmt: skip
    for name, fn, passes in cases:
        ms = timed(fn, repeat)
        print(f"{name:<28}{ms:>12.1f}{ms / passes:>12.2f}")
    load_ms = timed(lambda: torch.jit.load(io.BytesIO(data)), repeat)
    print(f"{'torch.jit.load (cache miss)':<28}{load_ms:>12.1f}")


async def bench_http(batch: int, repeat: int) -> None:
    import httpx

    from flplatform.app import create_app
    from flplatform.migrate import upgrade
    from flplatform.orm import GlobalModel, User
    from flplatform.settings import Settings
    from flplatform.users.schemas import UserCreate
    from flplatform.users.service import create_user

    directory = tempfile.mkdtemp(prefix="flp-bench-")
    url = f"sqlite+aiosqlite:///{directory}/bench.db"
    await asyncio.to_thread(upgrade, url)
    app = create_app(Settings(database_url=url, log_level="WARNING"))
    _, data = scripted(0)
    async with app.router.lifespan_context(app):
        async with app.state.sessionmaker() as session:
            user, token = await create_user(
                session,
                UserCreate(username="bench", password="password-123"),
                created_by=User(is_superuser=True),
            )
            model = GlobalModel(owner_id=user.id, name="cnn", weights=data, weights_format="torchscript",
                                weights_size=len(data), input_shape=[None, 1, 28, 28])  # fmt: skip
            session.add(model)
            await session.commit()
            model_id = str(model.id)
        headers = {"Authorization": f"Token {token}"}
        x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        buffer = io.BytesIO()
        np.save(buffer, x, allow_pickle=False)
        npy = buffer.getvalue()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:

            async def run(kind: str, method: str) -> float:
                samples = []
                for index in range(repeat + 1):
                    start = time.perf_counter()
                    if kind == "json list":
                        r = await client.post("/api/inference/", headers=headers, json={
                            "model_id": model_id, "model_input": x.tolist(), "uncertainty_method": method})  # fmt: skip
                    elif kind == "json base64 npy":
                        r = await client.post("/api/inference/", headers=headers, json={
                            "model_id": model_id, "model_input": base64.b64encode(npy).decode(),
                            "uncertainty_method": method})  # fmt: skip
                    else:
                        r = await client.post("/api/inference/", headers=headers, files={"model_input": ("x.npy", npy)},
                                              data={"model_id": model_id, "uncertainty_method": method})  # fmt: skip
                    assert r.status_code == 200, r.text
                    if index:  # the first call loads the module (cache miss)
                        samples.append(time.perf_counter() - start)
                return statistics.median(samples) * 1000

            print(
                f"\nHTTP (ASGI in-process, SQLite), batch {batch} of 1×28×28, {len(npy) / 1e6:.2f} MB as .npy"
            )
            print(f"{'input':<20}{'method':<14}{'median ms':>12}")
            for kind in ("json list", "json base64 npy", "multipart npy"):
                for method in ("NONE", "MC_DROPOUT"):
                    print(f"{kind:<20}{method:<14}{await run(kind, method):>12.1f}")
            cache = app.state.inference_runtime.cache
            print(f"module cache: {cache.hits} hits, {cache.misses} misses")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; run id {uuid.uuid4().hex[:8]}")
    bench_methods(args.batch, args.repeat)
    asyncio.run(bench_http(args.batch, args.repeat))


if __name__ == "__main__":
    main()
