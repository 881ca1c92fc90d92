"""A round that will fold its updates on arrival is prepared when it starts (trainings.fold_ahead):
the process reserves and faults in the float64 sum's memory at the training's start and after each
round's commit, the round's first fold takes that reservation, and the result is the same weighted
mean. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from flplatform.aggregation import buffers
from flplatform.settings import Settings
from tests.training.conftest import (
    as_safetensors,
    create_training,
    fedavg,
    post_update,
    scripted_bytes,
    shifted,
    state_of,
    upload_global,
)
from tests.training.test_lifecycle_api import wait_training

WIDTH = 600  # 360,600 float32 weights: a 2.9 MB float64 sum, over the 2 MiB a reservation needs
SUM_BYTES = (WIDTH * WIDTH + WIDTH) * 8


class WideNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.fixture
def settings(db_url: str) -> Settings:
    """Folding on arrival for these small updates too (the default threshold is 4 MiB)."""
    return Settings(
        database_url=db_url,
        notification_backoff_seconds=0.01,
        notification_max_attempts=2,
        notification_timeout_seconds=2.0,
        training_sweep_interval_seconds=0.05,
        fold_max_open_rounds=4,
        fold_on_arrival_min_bytes=0,
    )


@pytest.fixture(autouse=True)
def no_reservation() -> Iterator[None]:
    buffers.release_reserved()
    yield
    buffers.release_reserved()


async def _until(cond: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := cond()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition never met")
        await asyncio.sleep(0.02)
    return value


async def test_each_round_is_prepared_when_it_starts_and_its_first_fold_takes_the_memory(
    client, alice, make_user
):
    torch.manual_seed(3)
    initial = scripted_bytes(WideNet())
    state = state_of(initial)
    clients = [await make_user(f"ahead{i}", client=True) for i in range(2)]
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        target_num_updates=2,
        options={"skip_model_tests": True},
    )
    assert buffers.reserved_bytes() == 0
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202, r.text
    await _until(lambda: buffers.reserved_bytes() == SUM_BYTES)  # before any upload
    expected = state
    for round_ in (0, 1):
        await wait_training(
            client,
            alice.headers,
            training_id,
            lambda b, n=round_: b["state"] == "O" and b["phase"] == "update" and b["round"] == n,
        )
        await _until(lambda: buffers.reserved_bytes() == SUM_BYTES)  # round 1: after round 0's commit
        updates = [shifted(expected, 0.25 * (i + 1) + round_) for i in range(2)]
        r = await post_update(
            client, clients[0].headers, model_id, as_safetensors(updates[0]), round_, sample_size=3
        )
        assert r.status_code == 201, r.text
        await _until(lambda: buffers.reserved_bytes() == 0)  # the first fold took it
        r = await post_update(
            client, clients[1].headers, model_id, as_safetensors(updates[1]), round_, sample_size=5
        )
        assert r.status_code == 201, r.text
        expected = fedavg(updates, [3, 5])
    body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
    assert body["state"] == "C", body
    got = state_of((await client.get(f"/api/models/{model_id}/", headers=alice.headers)).content)
    for key in got:
        assert torch.allclose(got[key].double(), expected[key].double(), atol=1e-6), key


async def test_rounds_that_fold_at_the_close_reserve_nothing(client, alice, make_user):
    torch.manual_seed(4)
    initial = scripted_bytes(WideNet())
    clients = [await make_user(f"median{i}", client=True) for i in range(2)]
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        target_num_updates=1,
        options={"skip_model_tests": True, "aggregator": "median"},
    )
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202, r.text
    await wait_training(
        client, alice.headers, training_id, lambda b: b["state"] == "O" and b["phase"] == "update"
    )
    await asyncio.sleep(0.3)  # what the start's after-commit work would have done by now
    assert buffers.reserved_bytes() == 0
