"""The global model's tensor layout is stored by weights digest (issue 21, item 1): an update is
checked against the stored layout, never against the weights read again; a round's new global
carries its predecessor's layout; an uploaded TorchScript global model gets its layout (and its
archive's storage plan) from the sandbox's upload check, so nothing decodes it later; a blob without
a stored layout (a model from before the table, or a row removed) gets it computed from the weights
on first use."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from sqlalchemy import delete, select

from flplatform.models import archive_weights, layouts
from flplatform.models import files as model_files
from flplatform.orm import Model, WeightsLayout
from flplatform.trainings import aggregate, archive_plans
from tests.training.conftest import (
    as_safetensors,
    create_training,
    post_update,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
    upload_global,
)
from tests.training.test_lifecycle_api import wait_training


async def _digest(app: Any, model_id: str) -> str:
    async with app.state.sessionmaker() as session:
        digest = (
            await session.execute(select(Model.weights_digest).where(Model.id == uuid.UUID(model_id)))
        ).scalar_one()
    assert digest is not None
    return digest


async def _stored_layout(app: Any, digest: str) -> dict[str, Any] | None:
    async with app.state.sessionmaker() as session:
        return (
            await session.execute(select(WeightsLayout.layout).where(WeightsLayout.digest == digest))
        ).scalar_one_or_none()


async def _start(client: Any, alice: Any, make_user: Any, prefix: str) -> tuple[list[Any], str, str, bytes]:
    clients = [await make_user(f"{prefix}{i}", client=True) for i in range(2)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        target_num_updates=2,
        options={"skip_model_tests": True},
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    await wait_training(
        client, alice.headers, training_id, lambda b: b["state"] == "O" and b["phase"] == "update"
    )
    return clients, model_id, training_id, initial


async def test_updates_are_checked_against_the_stored_layout_which_each_round_carries(
    app, client, alice, make_user, monkeypatch: pytest.MonkeyPatch
):
    layouts.forget_cache()
    clients, model_id, training_id, initial = await _start(client, alice, make_user, "lay")
    state = state_of(initial)
    first = await _digest(app, model_id)
    stored = await _stored_layout(app, first)  # stored at the upload, from the sandbox's check
    assert stored == layouts.encode(
        {k: aggregate.TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}
    )

    r = await post_update(client, clients[0].headers, model_id, as_safetensors(shifted(state, 1.0)), 0)
    assert r.status_code == 201, r.text
    assert await _stored_layout(app, first) == stored

    wrong = dict(state)
    name = next(iter(wrong))
    wrong[name] = torch.zeros(tuple(d + 1 for d in wrong[name].shape), dtype=wrong[name].dtype)
    r = await post_update(client, clients[1].headers, model_id, as_safetensors(wrong), 0)
    assert 400 <= r.status_code < 500, r.text
    assert name in r.text

    r = await post_update(client, clients[1].headers, model_id, as_safetensors(shifted(state, 2.0)), 0)
    assert r.status_code == 201, r.text
    await wait_training(client, alice.headers, training_id, lambda b: b["round"] == 1 or b["state"] == "E")
    second = await _digest(app, model_id)
    assert second != first
    assert await _stored_layout(app, second) == stored  # carried by the aggregation

    # Round 1 is checked without reading the global model's weights at all.
    async def no_weights(*_args: Any, **_kwargs: Any) -> bytes:
        raise AssertionError("the global model's weights were read to check an update")

    monkeypatch.setattr(aggregate, "global_weights", no_weights)
    layouts.forget_cache()  # from the table, not this process's cache
    r = await post_update(client, clients[0].headers, model_id, as_safetensors(shifted(state, 3.0)), 1)
    assert r.status_code == 201, r.text
    r = await post_update(client, clients[1].headers, model_id, as_safetensors(wrong), 1)
    assert 400 <= r.status_code < 500, r.text


class _Net(torch.nn.Module):
    """Distinct random weights, no buffers: every tensor has a storage of its own in the archive."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 7)
        self.fc2 = torch.nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


async def test_an_uploaded_global_model_is_never_decoded_for_its_layout_or_storage_plan(
    app, client, alice, make_user, monkeypatch: pytest.MonkeyPatch
):
    """Round 0 used to decode the global archive whole (≈ 3× the model in the server) for the first
    update's check and for the round close's storage plan: both come from the upload's check now."""
    layouts.forget_cache()
    torch.manual_seed(1)
    initial = scripted_bytes(_Net())
    state = state_of(initial)
    expected_plan = archive_weights.storage_plan(initial, state)
    assert expected_plan is not None

    async def no_decode(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the global model was decoded")

    monkeypatch.setattr(model_files, "decode_state_dict_async", no_decode)
    model_id = await upload_global(client, alice.headers, initial)
    digest = await _digest(app, model_id)
    async with app.state.sessionmaker() as session:
        row = (
            await session.execute(select(WeightsLayout).where(WeightsLayout.digest == digest))
        ).scalar_one()
    assert layouts.decode(row.layout) == {
        k: aggregate.TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()
    }
    assert row.storage_plan == expected_plan

    clients = [await make_user(f"noplan{i}", client=True) for i in range(2)]
    training_id = await create_training(
        client, alice.headers, model_id, [c.id for c in clients], target_num_updates=1,
        options={"skip_model_tests": True},
    )  # fmt: skip
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    await wait_training(
        client, alice.headers, training_id, lambda b: b["state"] == "O" and b["phase"] == "update"
    )
    layouts.forget_cache()  # from the table
    archive_plans._PLANS.pop(uuid.UUID(model_id), None)
    await archive_plans.learn(app.state.sessionmaker, uuid.UUID(model_id))
    assert archive_plans._PLANS[uuid.UUID(model_id)] == expected_plan
    for i, c in enumerate(clients):
        r = await post_update(client, c.headers, model_id, as_safetensors(shifted(state, float(i + 1))), 0)
        assert r.status_code == 201, r.text
    final = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("C", "E"))
    assert final["state"] == "C", final


def test_a_storage_plan_by_digest_needs_each_tensor_in_exactly_one_storage() -> None:
    torch.manual_seed(2)
    archive = scripted_bytes(_Net())
    state = state_of(archive)
    plan = archive_weights.storage_plan(archive, state)
    assert plan is not None and set(plan) == set(state)
    import hashlib

    sizes = {
        k: (v.numel() * v.element_size(), hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest())
        for k, v in state.items()
    }
    assert archive_weights.plan_by_digest(archive, sizes) == plan
    name = next(iter(sizes))
    assert archive_weights.plan_by_digest(archive, {**sizes, name: (sizes[name][0], "0" * 64)}) is None
    other = next(n for n in sizes if n != name)
    assert (
        archive_weights.plan_by_digest(archive, {**sizes, other: sizes[name]}) is None
    )  # one storage, two tensors


async def test_a_global_model_without_a_stored_layout_gets_it_from_its_weights(app, client, alice, make_user):
    layouts.forget_cache()
    clients, model_id, _training_id, initial = await _start(client, alice, make_user, "nolay")
    state = state_of(initial)
    r = await post_update(client, clients[0].headers, model_id, as_safetensors(shifted(state, 1.0)), 0)
    assert r.status_code == 201, r.text
    digest = await _digest(app, model_id)
    expected = await _stored_layout(app, digest)
    assert expected is not None
    # As after the migration: no row for the blob, and a fresh process (empty cache).
    async with app.state.sessionmaker() as session:
        await session.execute(delete(WeightsLayout).where(WeightsLayout.digest == digest))
        await session.commit()
    layouts.forget_cache()
    r = await post_update(client, clients[0].headers, model_id, as_safetensors(shifted(state, 2.0)), 0)
    assert r.status_code == 201, r.text
    assert await _stored_layout(app, digest) == expected


def test_layout_json_round_trip_and_malformed_rows() -> None:
    spec = {"w": aggregate.TensorSpec((3, 4), torch.float32), "n": aggregate.TensorSpec((), torch.int64)}
    assert layouts.decode(layouts.encode(spec)) == spec
    assert layouts.encode(spec) == {"w": ["float32", [3, 4]], "n": ["int64", []]}
    for bad in ({"w": ["no_such_dtype", [1]]}, {"w": ["float32"]}, {"w": ["Tensor", [1]]}):
        with pytest.raises(aggregate.ModelFileError):
            layouts.decode(bad)
