"""Lifecycle through the API (in-process ASGI client; clients without notification endpoints)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import torch

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


async def wait_training(
    client: httpx.AsyncClient, headers: dict[str, str], training_id: str, cond: Any, timeout: float = 15.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = (await client.get(f"/api/trainings/{training_id}/", headers=headers)).json()
        if cond(body):
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"training never reached the condition: {body}")
        await asyncio.sleep(0.05)


async def test_two_round_fedavg_with_test_rounds(client, alice, make_user):
    c1 = await make_user("c1", client=True)
    c2 = await make_user("c2", client=True)
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(client, alice.headers, model_id, [c1.id, c2.id])
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202 and r.json()["detail"] == "Training started!"
    state = state_of(initial)
    history = [state]
    for round_ in range(2):
        s1, s2 = shifted(state, 1.0 + round_), shifted(state, -0.5)
        r = await post_update(client, c1.headers, model_id, as_safetensors(s1), round_, 30, {"loss": 0.5})
        assert r.status_code == 201, r.text
        assert r.json()["detail"] == "Model Update Accepted"
        detail = (await client.get(f"/api/trainings/{training_id}/", headers=c1.headers)).json()
        assert detail["local_models_arrived"] == 1 and detail["local_models_expected"] == 2
        r = await post_update(client, c2.headers, model_id, scripted_with(initial, s2), round_, 10)
        assert r.status_code == 201, r.text
        body = await wait_training(client, alice.headers, training_id, lambda b: b["phase"] == "test")
        assert body["round"] == round_ + 1
        state = fedavg([s1, s2], [30, 10])
        got = state_of((await client.get(f"/api/models/{model_id}/", headers=c1.headers)).content)
        for k in state:
            assert torch.allclose(got[k].to(torch.float64), state[k].to(torch.float64), atol=1e-6), k
        history.append(state)
        for c in (c1, c2):
            r = await client.post(
                f"/api/models/{model_id}/metrics/",
                headers=c.headers,
                data={"metric_names": ["accuracy"], "metric_values": ["0.9"]},
            )
            assert r.status_code == 201, r.text
        await wait_training(
            client,
            alice.headers,
            training_id,
            lambda b, round_=round_: (
                b["state"] == "C" or (b["phase"] == "update" and b["round"] == round_ + 1)
            ),
        )
    final = await wait_training(client, alice.headers, training_id, lambda b: b["state"] == "C")
    assert final["round"] == 2
    for round_, expected in enumerate(history):
        r = await client.get(f"/api/models/{model_id}/", params={"round": round_}, headers=alice.headers)
        assert r.status_code == 200
        got = state_of(r.content)
        assert torch.allclose(got["fc1.weight"], expected["fc1.weight"].to(torch.float32), atol=1e-6)
    # local-model metrics are kept
    models = (await client.get(f"/api/trainings/{training_id}/models/", headers=alice.headers)).json()
    assert len(models) == 5
    local = next(m for m in models if m["type"] == "LOCAL" and m["owner"] == c1.id)
    metrics = (await client.get(f"/api/models/{local['id']}/metrics/", headers=c1.headers)).json()
    assert [m["key"] for m in metrics] == ["loss"]


def scripted_with(template: bytes, state: dict[str, torch.Tensor]) -> bytes:
    import io

    module = torch.jit.load(io.BytesIO(template))
    with torch.no_grad():
        for k, v in module.state_dict().items():
            v.copy_(state[k])
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()
