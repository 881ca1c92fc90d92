"""Updates are folded into the round's running aggregate as they arrive (issue 21, item 4): the
folder of the open round holds what it folded, a re-upload that replaces a folded update makes it
fold the round again (never a subtraction), and a round closed without a folder (another process,
a restart) folds everything from the store. Either way the new global model is the weighted mean
of the updates that stand when the round closes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import torch
from sqlalchemy import select

from flplatform.blobs import FileBlobStore, store_for
from flplatform.orm import LocalModel
from flplatform.settings import Settings
from flplatform.trainings import folding
from tests.page_cache import page_cache_can_be_dropped, resident_pages
from tests.training.conftest import (
    as_safetensors,
    create_training,
    fedavg,
    post_update,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
    upload_global,
)
from tests.training.test_lifecycle_api import wait_training


@pytest.fixture
def settings(db_url: str) -> Settings:
    """The training tests' settings with folding on arrival on (the default, explicit here), for
    these tiny updates too (by default updates under 4 MiB are folded at the close)."""
    return Settings(
        database_url=db_url,
        notification_backoff_seconds=0.01,
        notification_max_attempts=2,
        notification_timeout_seconds=2.0,
        training_sweep_interval_seconds=0.05,
        fold_max_open_rounds=4,
        fold_on_arrival_min_bytes=0,
    )


async def _until(cond: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := cond()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition never met")
        await asyncio.sleep(0.02)
    return value


def _folder(model_id: str) -> folding.RoundFolder | None:
    return folding.open_folders().get(uuid.UUID(model_id))


async def _start(
    client: Any, alice: Any, make_user: Any, prefix: str, **options: Any
) -> tuple[list[Any], str, str, dict[str, torch.Tensor]]:
    clients = [await make_user(f"{prefix}{i}", client=True) for i in range(3)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        target_num_updates=1,
        options={"skip_model_tests": True, **options},
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    await wait_training(
        client, alice.headers, training_id, lambda b: b["state"] == "O" and b["phase"] == "update"
    )
    return clients, model_id, training_id, state_of(initial)


def _close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.allclose(got[key].double(), expected[key].double(), atol=1e-6), key


async def test_updates_fold_on_arrival_and_a_replaced_update_is_folded_again(client, alice, make_user):
    clients, model_id, training_id, state = await _start(client, alice, make_user, "fold")
    first = shifted(state, 1.0)
    r = await post_update(client, clients[0].headers, model_id, as_safetensors(first), 0, sample_size=10)
    assert r.status_code == 201, r.text
    folder = await _until(lambda: (f := _folder(model_id)) is not None and len(f.folded) == 1 and f)
    second = shifted(state, 2.0)
    r = await post_update(client, clients[1].headers, model_id, as_safetensors(second), 0, sample_size=20)
    assert r.status_code == 201, r.text
    await _until(lambda: len(folder.folded) == 2)
    assert folder.refolds == 0
    # client 0 uploads again: other bytes, another sample size; its first update is no longer part of the round
    replaced = shifted(state, -3.0)
    r = await post_update(client, clients[0].headers, model_id, as_safetensors(replaced), 0, sample_size=5)
    assert r.status_code == 201, r.text
    await _until(lambda: folder.refolds == 1 and len(folder.folded) == 2)
    third = shifted(state, 0.5)
    r = await post_update(client, clients[2].headers, model_id, as_safetensors(third), 0, sample_size=30)
    assert r.status_code == 201, r.text
    body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
    assert body["state"] == "C", body
    got = state_of((await client.get(f"/api/models/{model_id}/", headers=alice.headers)).content)
    _close(got, fedavg([replaced, second, third], [5, 20, 30]))
    assert folder.closed and _folder(model_id) is None
    assert folder.on_arrival == 3  # all three rows folded before the round closed (the last one too)


async def test_a_round_closed_without_a_folder_folds_everything_from_the_store(
    client, alice, make_user, monkeypatch: pytest.MonkeyPatch
):
    async def nothing(*_args: Any) -> None:
        return None

    monkeypatch.setattr(folding, "on_update", nothing)  # as if another process, or a restarted one
    clients, model_id, training_id, state = await _start(client, alice, make_user, "cold")
    updates = [shifted(state, 0.3 * (i + 1)) for i in range(3)]
    for i, (c, update) in enumerate(zip(clients, updates, strict=True)):
        r = await post_update(
            client, c.headers, model_id, as_safetensors(update), 0, sample_size=10 * (i + 1)
        )
        assert r.status_code == 201, r.text
    body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
    assert body["state"] == "C", body
    assert _folder(model_id) is None
    got = state_of((await client.get(f"/api/models/{model_id}/", headers=alice.headers)).content)
    _close(got, fedavg(updates, [10, 20, 30]))


async def test_a_closed_rounds_updates_leave_the_page_cache(app, client, alice, make_user):
    """Once a round is closed its updates are not read again: their pages go back to the kernel
    (for the next round's uploads to reuse), their bytes stay stored."""
    clients, model_id, training_id, state = await _start(client, alice, make_user, "cache")
    for i, c in enumerate(clients):
        update = as_safetensors(shifted(state, 0.1 * (i + 1)))
        r = await post_update(client, c.headers, model_id, update, 0, sample_size=10 + i)
        assert r.status_code == 201, r.text
    body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
    assert body["state"] == "C", body
    async with app.state.sessionmaker() as session:
        store = store_for(session)
        digests = set(
            (
                await session.execute(
                    select(LocalModel.weights_digest).where(LocalModel.base_model_id == uuid.UUID(model_id))
                )
            ).scalars()
        )
    assert len(digests) == 3
    if not isinstance(store, FileBlobStore) or not page_cache_can_be_dropped(store.spool):
        pytest.skip("needs the filesystem store on a filesystem whose page cache can be dropped")
    paths = [store.path(d) for d in digests if d is not None]
    await _until(lambda: all(resident_pages(p) == 0 for p in paths))
    for digest in digests:
        assert digest is not None and await store.read(digest)  # still stored


async def test_methods_that_need_every_update_keep_the_close_time_path(client, alice, make_user):
    clients, model_id, training_id, state = await _start(client, alice, make_user, "med", aggregator="median")
    updates = [shifted(state, float(i)) for i in range(3)]
    for c, update in zip(clients, updates, strict=True):
        r = await post_update(client, c.headers, model_id, as_safetensors(update), 0)
        assert r.status_code == 201, r.text
        assert _folder(model_id) is None
    body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
    assert body["state"] == "C", body
    got = state_of((await client.get(f"/api/models/{model_id}/", headers=alice.headers)).content)
    _close(got, updates[1])  # the coordinate-wise median of shifts 0, 1, 2


def test_streamed_methods_accumulate_in_float64_unless_the_training_chose():
    assert folding.method_options({}) == ("fedavg", {"accumulate_dtype": "float64"}, True)
    name, kwargs, foldable = folding.method_options({"aggregator": "fedadam"})
    assert kwargs["accumulate_dtype"] == "float64" and foldable
    chosen = {"aggregator_options": {"accumulate_dtype": "float32"}}
    assert folding.method_options(chosen)[1:] == ({"accumulate_dtype": "float32"}, False)
    assert folding.method_options({"aggregator": "median"})[2] is False
    assert folding.method_options({"dp": {"clip_norm": 1.0, "noise_multiplier": 0.5}})[2] is False
    assert folding.method_options({"daisy_chain_period": 1})[2] is False


async def test_folded_on_arrival_in_any_order_the_model_is_bitwise_the_close_time_ones(
    client, alice, make_user, monkeypatch: pytest.MonkeyPatch
):
    """The same updates: arrived in one order and folded at the close (no folder), arrived in
    another and folded on arrival: the same bits (flplatform.aggregation.ordering)."""
    g = torch.Generator().manual_seed(5)

    async def run(prefix: str, arrival: list[int], updates: list[dict[str, torch.Tensor]] | None) -> Any:
        clients, model_id, training_id, state = await _start(client, alice, make_user, prefix)
        if updates is None:  # mixed exponents and cancellation: float64 sums that depend on the order
            updates = [
                {
                    k: (
                        torch.randn(v.shape, generator=g)
                        * torch.exp2(torch.randint(-30, 30, v.shape, generator=g))
                    )
                    if v.is_floating_point()
                    else v
                    for k, v in state.items()
                }
                for _ in range(3)
            ]
            updates[1] = {k: -v if v.is_floating_point() else v for k, v in updates[0].items()}
        for i in arrival:
            r = await post_update(
                client, clients[i].headers, model_id, as_safetensors(updates[i]), 0, sample_size=10 * (i + 1)
            )
            assert r.status_code == 201, r.text
        body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
        assert body["state"] == "C", body
        return updates, state_of(
            (await client.get(f"/api/models/{model_id}/", headers=alice.headers)).content
        )

    async def nothing(*_args: Any) -> None:
        return None

    monkeypatch.setattr(folding, "on_update", nothing)
    updates, at_close = await run("bitc", [1, 2, 0], None)
    monkeypatch.undo()
    _, on_arrival = await run("bita", [2, 0, 1], updates)
    assert at_close.keys() == on_arrival.keys()
    for key in at_close:
        assert torch.equal(at_close[key], on_arrival[key]), key


async def test_small_updates_fold_at_the_close_and_mixed_rounds_give_the_same_bits(
    client, alice, make_user, settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    """Updates under FLP_FOLD_ON_ARRIVAL_MIN_BYTES open no folder (the close folds them); a round
    where some updates were folded on arrival and the others at the close gives the bits of one
    folded on arrival throughout, whatever the arrival order."""
    g = torch.Generator().manual_seed(7)
    huge = 1 << 40

    async def run(prefix: str, arrival: list[int], thresholds: list[int], updates: Any) -> Any:
        clients, model_id, training_id, state = await _start(client, alice, make_user, prefix)
        if updates is None:  # mixed exponents and cancellation, as in the test above
            updates = [
                {
                    k: (
                        torch.randn(v.shape, generator=g)
                        * torch.exp2(torch.randint(-30, 30, v.shape, generator=g))
                    )
                    if v.is_floating_point()
                    else v
                    for k, v in state.items()
                }
                for _ in range(3)
            ]
            updates[2] = {k: -v if v.is_floating_point() else v for k, v in updates[0].items()}
        folders: list[folding.RoundFolder | None] = []
        for i, threshold in zip(arrival, thresholds, strict=True):
            settings.fold_on_arrival_min_bytes = threshold
            r = await post_update(
                client, clients[i].headers, model_id, as_safetensors(updates[i]), 0, sample_size=7 * (i + 1)
            )
            assert r.status_code == 201, r.text
            if threshold == 0 and len(folders) == 0:  # the first update on arrival: folded before the next
                folders.append(await _until(lambda: (f := _folder(model_id)) is not None and f.folded and f))
            elif not folders:
                assert _folder(model_id) is None  # a small update opens no folder
        body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
        assert body["state"] == "C", body
        got = state_of((await client.get(f"/api/models/{model_id}/", headers=alice.headers)).content)
        return updates, got, folders[0] if folders else None

    updates, at_close, none = await run("smc", [1, 2, 0], [huge, huge, huge], None)
    assert none is None
    _close(at_close, fedavg(updates, [7, 14, 21]))
    _, on_arrival, folder = await run("sma", [2, 0, 1], [0, 0, 0], updates)
    assert folder is not None and folder.on_arrival >= 2

    async def not_following(self: folding.RoundFolder) -> None:
        return None  # as if the later updates reached another process

    monkeypatch.setattr(folding.RoundFolder, "follow", not_following)
    _, mixed, folder = await run("smm", [0, 1, 2], [0, huge, huge], updates)
    assert folder is not None and folder.on_arrival == 1  # the other two were folded at the close
    for got in (on_arrival, mixed):
        assert got.keys() == at_close.keys()
        for key in at_close:
            assert torch.equal(at_close[key], got[key]), key


async def test_an_upload_whose_round_another_process_folds_leaves_the_claim_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``on_update`` where another process holds the round's fold lock: no claim at once (the folding
    process claims, woken by the upload's event), only the backstop re-check after a delay."""

    async def elsewhere(*_args: object, **_kwargs: object) -> tuple[None, bool]:
        return None, True

    monkeypatch.setattr(folding, "_open", elsewhere)
    monkeypatch.setattr(folding, "CLAIM_BACKSTOP_SECONDS", 0.3)
    calls: list[float] = []

    async def advance(_training_id: uuid.UUID, still_open: bool | None) -> None:
        assert still_open is None  # read afresh: the upload's own answer is stale by then
        calls.append(asyncio.get_running_loop().time())

    settings = Settings(database_url="sqlite+aiosqlite://", fold_max_open_rounds=4)
    started = asyncio.get_running_loop().time()
    task = asyncio.create_task(folding.on_update(None, settings, uuid.uuid4(), None, advance, False))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    assert calls == []  # not at once
    await task
    assert len(calls) == 1 and calls[0] - started >= 0.3
