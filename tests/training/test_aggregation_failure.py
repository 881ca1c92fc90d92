"""An aggregation that cannot be computed puts the training into E with the reason (the
reference left it in O forever); the round's uploads and every stored round stay readable."""

from __future__ import annotations

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


async def test_zero_total_weight_errors_the_training_with_the_reason(client, alice, make_user):
    clients = [await make_user(f"z{i}", client=True) for i in range(2)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client, alice.headers, model_id, [c.id for c in clients], options={"skip_model_tests": True}
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    state = state_of(initial)
    for c in clients:  # both report zero samples: FedAvg has no weight to average with
        r = await post_update(
            client, c.headers, model_id, as_safetensors(shifted(state, 1.0)), 0, sample_size=0
        )
        assert r.status_code == 201, r.text
    body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] in ("E", "C"))
    assert body["state"] == "E" and body["error_reason"], body
    assert "weight" in body["error_reason"].lower() or "sample" in body["error_reason"].lower(), body[
        "error_reason"
    ]
    # nothing was lost: round 0 still downloads, the updates are listed
    assert (
        await client.get(f"/api/models/{model_id}/", params={"round": 0}, headers=alice.headers)
    ).content == initial
    listed = (await client.get(f"/api/trainings/{training_id}/models/", headers=alice.headers)).json()
    assert len(listed) == 3
