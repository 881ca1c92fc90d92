"""Every route's error paths, bad uploads, and lifecycle rules (in-process ASGI client)."""

from __future__ import annotations

import asyncio
import io
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from sqlalchemy import func, select

from flplatform.orm import GlobalModelRound, Notification
from flplatform.trainings import hooks as training_hooks
from tests.conftest import free_port
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


async def _started(client, alice, make_user, n: int = 2, **fields: Any):
    clients = [await make_user(f"p{i}", client=True) for i in range(n)]
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(client, alice.headers, model_id, [c.id for c in clients], **fields)
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202, r.text
    return clients, model_id, training_id, state_of(initial)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/flp-pwned",))


async def test_bad_updates_get_clear_4xx(client, alice, bob, make_user):
    clients, model_id, training_id, state = await _started(client, alice, make_user)
    c0 = clients[0]
    good = as_safetensors(shifted(state, 0.5))
    cases = {
        "wrong round": (c0, good, 3, 400, "round"),
        "non-participant": (bob, good, 0, 403, "participant"),
        "wrong shapes": (c0, as_safetensors({**state, "fc1.weight": torch.zeros(5, 4)}), 0, 400, "shape"),
        "missing tensor": (
            c0,
            as_safetensors({k: v for k, v in state.items() if k != "fc2.bias"}),
            0,
            400,
            "missing",
        ),
        "wrong dtype": (
            c0,
            as_safetensors({**state, "fc1.bias": state["fc1.bias"].double()}),
            0,
            400,
            "dtype",
        ),
        "nan": (c0, as_safetensors({**state, "fc1.bias": torch.full((3,), float("nan"))}), 0, 400, "NaN"),
        "pickle bomb": (c0, pickle.dumps(_Evil()), 0, 400, "Accepted formats"),
        "torch.save(module)": (c0, _torch_save(tiny_net()), 0, 400, "Accepted formats"),
        "truncated": (c0, good[: len(good) // 2], 0, 400, ""),
        "truncated torchscript": (c0, scripted_bytes(tiny_net())[:300], 0, 400, ""),
        "garbage": (c0, b"hello world, not a model", 0, 400, "Accepted formats"),
        "empty": (c0, b"", 0, 400, "empty"),
    }
    for name, (who, data, round_, status, text) in cases.items():
        r = await post_update(client, who.headers, model_id, data, round_)
        assert r.status_code == status, (name, r.text)
        body = r.json()
        assert text in body["detail"] and body["code"], (name, body)
    import os

    assert not os.path.exists("/tmp/flp-pwned")
    r = await client.post(
        f"/api/models/{model_id}/", headers=c0.headers, data={"round": "0"}, files={"model_file": ("u", good)}
    )
    assert r.status_code == 422  # sample_size missing
    r = await client.post(
        f"/api/models/{model_id}/", headers=c0.headers, data={"round": "0", "sample_size": "1"}
    )
    assert r.status_code == 422  # model_file missing
    # torch.save(state_dict) (weights_only) is accepted
    r = await post_update(client, c0.headers, model_id, _torch_save(shifted(state, 1.0)), 0)
    assert r.status_code == 201, r.text
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert detail["local_models_arrived"] == 1 and detail["state"] == "O"


def _torch_save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


async def test_global_model_uploads_and_downloads(client, alice, bob):
    for data, status in (
        (_torch_save(tiny_net()), 400),
        (pickle.dumps(_Evil()), 400),
        (b"xx", 400),
        (scripted_bytes(tiny_net())[:-50], 400),
    ):
        r = await client.post(
            "/api/models/",
            headers=alice.headers,
            data={"name": "n", "description": ""},
            files={"model_file": ("m.pt", data)},
        )
        assert r.status_code == status, r.text
        assert "TorchScript" in r.json()["detail"] or r.json()["code"] == "invalid_model_file"
    r = await client.post("/api/models/", headers=alice.headers, data={"name": "n", "description": ""})
    assert r.status_code == 400 and "model_file" in r.json()["detail"]
    r = await client.post(
        "/api/models/",
        headers=alice.headers,
        data={"description": "x"},
        files={"model_file": ("m.pt", scripted_bytes(tiny_net()))},
    )
    assert r.status_code == 400
    model_id = await upload_global(client, alice.headers, input_shape=["None", "4"])
    info = (await client.get(f"/api/models/{model_id}/info/", headers=alice.headers)).json()
    assert info["input_shape"] == [None, 4] and info["type"] == "GLOBAL" and info["rounds"] == [0]
    r = await client.get(f"/api/models/{model_id}/", headers=alice.headers)
    assert r.status_code == 200 and r.headers["content-disposition"] == f'filename="model-{model_id}.pt"'
    assert r.headers["content-type"] == "application/octet-stream"
    assert (await client.get(f"/api/models/{model_id}/", headers=bob.headers)).status_code == 403
    assert (
        await client.get(f"/api/models/{model_id}/", params={"round": 5}, headers=alice.headers)
    ).status_code == 404
    missing = "00000000-0000-0000-0000-000000000000"
    assert (await client.get(f"/api/models/{missing}/", headers=alice.headers)).status_code == 404
    assert (await client.get("/api/models/not-a-uuid/", headers=alice.headers)).status_code == 422
    assert (await client.get(f"/api/models/{model_id}/")).status_code == 401
    listed = (await client.get("/api/models/", headers=alice.headers)).json()
    assert [m["id"] for m in listed] == [model_id]
    assert (await client.get("/api/models/", headers=bob.headers)).json() == []
    # preprocessing
    r = await client.get(f"/api/models/{model_id}/preprocessing/", headers=alice.headers)
    assert r.status_code == 404
    pre = scripted_bytes(torch.nn.Identity())
    r = await client.post(
        f"/api/models/{model_id}/preprocessing/",
        headers=bob.headers,
        files={"model_preprocessing_file": ("p.pt", pre)},
    )
    assert r.status_code == 403
    r = await client.post(
        f"/api/models/{model_id}/preprocessing/",
        headers=alice.headers,
        files={"model_preprocessing_file": ("p.pt", b"junk-junk-junk")},
    )
    assert r.status_code == 400
    r = await client.post(
        f"/api/models/{model_id}/preprocessing/",
        headers=alice.headers,
        files={"model_preprocessing_file": ("p.pt", pre)},
    )
    assert r.status_code == 202 and r.json()["detail"] == "Preprocessing Model Upload Accepted"
    assert (await client.get(f"/api/models/{model_id}/preprocessing/", headers=alice.headers)).content == pre
    # MEAN model (JSON body) downloads as one TorchScript module averaging the members
    second = await upload_global(client, alice.headers, scripted_bytes(tiny_net(1)))
    r = await client.post(
        "/api/models/",
        headers=alice.headers,
        json={"name": "ens", "type": "MEAN", "models": [model_id, second]},
    )
    assert r.status_code == 201, r.text
    mean_id = r.json()["model_id"]
    module = torch.jit.load(
        io.BytesIO((await client.get(f"/api/models/{mean_id}/", headers=alice.headers)).content)
    )
    x = torch.randn(3, 4)
    m1 = tiny_net().eval()
    m2 = tiny_net(1).eval()
    module.eval()
    assert torch.allclose(module(x), (m1(x) + m2(x)) / 2, atol=1e-6)
    info = (await client.get(f"/api/models/{mean_id}/info/", headers=alice.headers)).json()
    assert info["type"] == "MEAN" and sorted(info["models"]) == sorted([model_id, second])
    r = await client.post(
        "/api/models/", headers=bob.headers, json={"name": "e", "type": "MEAN", "models": [model_id]}
    )
    assert r.status_code == 403
    r = await client.post(
        "/api/models/",
        headers=alice.headers,
        content=b"x",
    )
    assert r.status_code == 415
    # metrics
    r = await client.post(
        f"/api/models/{model_id}/metrics/", headers=alice.headers, data={"metric_names": ["a"]}
    )
    assert r.status_code == 400
    r = await client.post(
        f"/api/models/{model_id}/metrics/",
        headers=alice.headers,
        data={"metric_names": ["a", "b"], "metric_values": ["1.5", "text"]},
    )
    assert r.status_code == 201 and r.json()["detail"] == "Model Metrics Upload Accepted"
    metrics = (await client.get(f"/api/models/{model_id}/metrics/", headers=alice.headers)).json()
    assert {(m["key"], m["value_float"], m["value_binary"]) for m in metrics} == {
        ("a", 1.5, None),
        ("b", None, "dGV4dA=="),
    }
    assert (
        await client.post(
            f"/api/models/{model_id}/metrics/",
            headers=bob.headers,
            data={"metric_names": ["a"], "metric_values": ["1"]},
        )
    ).status_code == 403
    # delete
    assert (await client.delete(f"/api/models/{model_id}/", headers=bob.headers)).status_code == 403
    r = await client.delete(f"/api/models/{second}/", headers=alice.headers)
    assert r.status_code == 200 and r.json()["detail"] == "Model removed!"
    assert (await client.get(f"/api/models/{second}/", headers=alice.headers)).status_code == 404


async def test_training_routes_and_errors(client, alice, bob, make_user):
    model_id = await upload_global(client, alice.headers)
    base = {"model_id": model_id, "target_num_updates": 2, "aggregation_method": "FedAvg"}
    for bad in (
        {"options": {"unknown": 1}},
        {"options": {"uncertainty": {"X": 1}}},
        {"aggregation_method": "FedDC"},
        {"aggregation_method": "Nope"},
        {"target_num_updates": 0},
        {"options": {"aggregator": "nope"}},
        {"options": {"aggregator_options": {"bogus": 1}}},
        {"extra_field": True},
    ):
        r = await client.post("/api/trainings/", headers=alice.headers, json={**base, **bad})
        assert r.status_code == 422, (bad, r.text)
    r = await client.post(
        "/api/trainings/", headers=alice.headers, json={k: v for k, v in base.items() if k != "model_id"}
    )
    assert r.status_code == 422
    r = await client.post(
        "/api/trainings/",
        headers=alice.headers,
        content=b"{not json",
    )
    assert r.status_code in (400, 422)
    r = await client.post("/api/trainings/", headers=bob.headers, json=base)
    assert r.status_code == 403
    r = await client.post(
        "/api/trainings/", headers=alice.headers, json={**base, "uncertainty_method": "SWAG"}
    )
    assert r.status_code == 400 and "SWAG" in r.json()["detail"]
    r = await client.post(
        "/api/trainings/",
        headers=alice.headers,
        json={**base, "clients": ["00000000-0000-0000-0000-000000000000"]},
    )
    assert r.status_code == 400 and "Not all provided users were found" in r.json()["detail"]
    training_id = await create_training(
        client, alice.headers, model_id, [], options={"mu": 0.1, "aggregator": "fedavg"}
    )
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert detail["state"] == "I" and detail["mu"] == 0.1 and detail["options"]["mu"] == 0.1
    assert detail["local_models_expected"] == 0 and detail["metric_names"] == ["loss"]
    # a second training on the same model gets a clone
    other = await create_training(client, alice.headers, model_id, [])
    other_detail = (await client.get(f"/api/trainings/{other}/", headers=alice.headers)).json()
    assert other_detail["model"] != model_id
    assert (await client.get(f"/api/trainings/{training_id}/", headers=bob.headers)).status_code == 403
    missing = "00000000-0000-0000-0000-000000000000"
    assert (await client.get(f"/api/trainings/{missing}/", headers=alice.headers)).status_code == 404
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 400 and r.json()["detail"] == "At least one participant must be registered!"
    r = await client.put(
        f"/api/trainings/{training_id}/clients/", headers=bob.headers, json={"clients": [bob.id]}
    )
    assert r.status_code == 403
    r = await client.put(
        f"/api/trainings/{training_id}/clients/", headers=alice.headers, json={"clients": [bob.id]}
    )
    assert r.status_code == 202 and r.json()["detail"] == "Users registered as participants!"
    r = await client.put(
        f"/api/trainings/{training_id}/clients/", headers=alice.headers, json={"clients": [missing]}
    )
    assert r.status_code == 400
    r = await client.put(
        f"/api/trainings/{training_id}/clients/", headers=alice.headers, json={"clients": []}
    )
    assert r.status_code == 422
    assert (await client.get(f"/api/trainings/{training_id}/", headers=bob.headers)).status_code == 200
    assert (await client.post(f"/api/trainings/{training_id}/start/", headers=bob.headers)).status_code == 403
    listed = (await client.get("/api/trainings/", headers=alice.headers)).json()
    assert {t["id"] for t in listed} == {training_id, other}
    assert (await client.get("/api/trainings/", headers=bob.headers)).json() == []
    root = await make_user("root", superuser=True)  # superusers read every training, so they list every one
    assert {t["id"] for t in (await client.get("/api/trainings/", headers=root.headers)).json()} == {
        training_id,
        other,
    }
    mine = (await client.get("/api/users/trainings/", headers=bob.headers)).json()
    assert [t["id"] for t in mine] == [training_id]
    latest = (await client.get(f"/api/trainings/{training_id}/models/latest/", headers=alice.headers)).json()
    assert [m["id"] for m in latest] == [model_id]
    assert (await client.get(f"/api/trainings/{training_id}/models/", headers=bob.headers)).status_code == 200
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 400 and "INITIAL" in r.json()["detail"]
    # updates before/after the right state
    r = await post_update(client, bob.headers, other_detail["model"], b"x" * 10, 0)
    assert r.status_code == 403
    assert (await client.delete(f"/api/models/{model_id}/", headers=alice.headers)).status_code == 409
    r = await client.post(f"/api/trainings/{training_id}/stop/", headers=bob.headers)
    assert r.status_code == 403
    r = await client.post(
        f"/api/trainings/{training_id}/stop/", headers=alice.headers, json={"reason": "enough"}
    )
    assert r.status_code == 202
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert detail["state"] == "E" and detail["error_reason"] == "enough"
    assert (
        await client.post(f"/api/trainings/{training_id}/stop/", headers=alice.headers)
    ).status_code == 409
    state = state_of((await client.get(f"/api/models/{model_id}/", headers=bob.headers)).content)
    r = await post_update(client, bob.headers, model_id, as_safetensors(state), 0)
    assert r.status_code == 400 and "state E" in r.json()["detail"]
    r = await client.request(
        "DELETE", f"/api/trainings/{training_id}/clients/", headers=alice.headers, json={"clients": [bob.id]}
    )
    assert r.status_code == 200 and r.json()["detail"] == "Users removed from training participants!"
    assert (await client.delete(f"/api/trainings/{training_id}/", headers=bob.headers)).status_code == 403
    r = await client.delete(f"/api/trainings/{training_id}/", headers=alice.headers)
    assert r.status_code == 200 and r.json()["detail"] == "Training removed!"
    assert (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).status_code == 404


async def test_reupload_replaces_and_removal_completes_round(client, alice, make_user):
    clients, model_id, training_id, state = await _started(
        client, alice, make_user, n=3, options={"skip_model_tests": True}
    )
    c0, c1, c2 = clients
    assert (
        await post_update(client, c0.headers, model_id, as_safetensors(shifted(state, 5.0)), 0, 10)
    ).status_code == 201
    assert (
        await post_update(client, c0.headers, model_id, as_safetensors(shifted(state, 1.0)), 0, 10)
    ).status_code == 201
    assert (
        await post_update(client, c1.headers, model_id, as_safetensors(shifted(state, 3.0)), 0, 30)
    ).status_code == 201
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert (
        detail["local_models_arrived"] == 2 and detail["local_models_expected"] == 3 and detail["round"] == 0
    )
    r = await client.request(
        "DELETE", f"/api/trainings/{training_id}/clients/", headers=alice.headers, json={"clients": [c2.id]}
    )
    assert r.status_code == 200
    body = await wait_training(client, alice.headers, training_id, lambda b: b["round"] == 1)
    assert body["state"] == "O" and body["phase"] == "update"
    expected = fedavg([shifted(state, 1.0), shifted(state, 3.0)], [10, 30])
    got = state_of((await client.get(f"/api/models/{model_id}/", headers=c0.headers)).content)
    assert torch.allclose(got["fc1.weight"], expected["fc1.weight"], atol=1e-6)
    assert torch.equal(got["bn.num_batches_tracked"], expected["bn.num_batches_tracked"])
    assert (await client.get(f"/api/models/{model_id}/", headers=c2.headers)).status_code == 403


async def test_deadline_with_quorum_aggregates_and_without_errors(client, alice, make_user):
    clients, model_id, training_id, state = await _started(
        client,
        alice,
        make_user,
        n=3,
        options={
            "round_deadline_seconds": 4.0,  # round 0's two uploads must land before it, under CI load too
            "min_quorum": 2,
            "straggler_policy": "remove",
            "skip_model_tests": True,
        },
    )
    c0, c1, c2 = clients
    await post_update(client, c0.headers, model_id, as_safetensors(shifted(state, 1.0)), 0, 10)
    await post_update(client, c1.headers, model_id, as_safetensors(shifted(state, 2.0)), 0, 10)
    body = await wait_training(client, alice.headers, training_id, lambda b: b["round"] == 1)
    assert sorted(body["participants"]) == sorted([c0.id, c1.id])  # straggler removed
    # round 1: only one update, quorum 2 → Error after the deadline
    await post_update(client, c0.headers, model_id, as_safetensors(shifted(state, 1.0)), 1, 10)
    body = await wait_training(client, alice.headers, training_id, lambda b: b["state"] == "E")
    assert "deadline" in body["error_reason"] and "quorum 2" in body["error_reason"]


class _Endpoint:
    """A notification endpoint answering a fixed status."""

    def __init__(self, status: int):
        self.status = status
        self.received: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.received.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_rejecting_client_is_removed_and_unreachable_client_errors(client, alice, make_user):
    ok, rejecting = _Endpoint(202), _Endpoint(500)
    try:
        good = await make_user("good", client=True, message_endpoint=ok.url)
        bad = await make_user("bad", client=True, message_endpoint=rejecting.url, notify_client_removed=True)
        model_id = await upload_global(client, alice.headers)
        training_id = await create_training(client, alice.headers, model_id, [good.id, bad.id])
        assert (
            await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
        ).status_code == 202
        body = await wait_training(
            client, alice.headers, training_id, lambda b: b["participants"] == [good.id]
        )
        assert body["state"] == "O"
        import json

        kinds = [json.loads(m)["notification_type"] for m in rejecting.received]
        assert "UPDATE_ROUND_START" in kinds
        await wait_training(
            client,
            alice.headers,
            training_id,
            lambda b: any(json.loads(m)["notification_type"] == "CLIENT_REMOVED" for m in rejecting.received),
        )
        # unreachable client: training goes to E with the reason
        gone = await make_user("gone", client=True, message_endpoint=f"http://127.0.0.1:{free_port()}/x/")
        second = await create_training(
            client, alice.headers, await upload_global(client, alice.headers), [gone.id]
        )
        assert (
            await client.post(f"/api/trainings/{second}/start/", headers=alice.headers)
        ).status_code == 202
        body = await wait_training(client, alice.headers, second, lambda b: b["state"] == "E")
        assert "unreachable" in body["error_reason"]
    finally:
        ok.close()
        rejecting.close()


async def test_swag_upload_errors(client, alice, make_user):
    clients = [await make_user(f"s{i}", client=True) for i in range(2)]
    model_id = await upload_global(client, alice.headers, kind="SWAG")
    training_id = await create_training(
        client, alice.headers, model_id, [c.id for c in clients], uncertainty_method="SWAG"
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    n = sum(p.numel() for p in tiny_net().parameters())

    async def swag(who, first: bytes, second: bytes, round_: int = 1):
        return await client.post(
            f"/api/models/{model_id}/swag/",
            headers=who.headers,
            data={"round": str(round_), "sample_size": "5"},
            files={"first_moment_file": ("f", first), "second_moment_file": ("s", second)},
        )

    vec = as_safetensors({"moment": torch.ones(n)})
    r = await swag(clients[0], vec, vec)
    assert r.status_code == 400 and "SWAG round" in r.json()["detail"]  # still in the update phase
    state = state_of((await client.get(f"/api/models/{model_id}/", headers=clients[0].headers)).content)
    for c in clients:
        assert (
            await post_update(client, c.headers, model_id, as_safetensors(shifted(state, 1.0)), 0)
        ).status_code == 201
    await wait_training(client, alice.headers, training_id, lambda b: b["state"] == "S")
    for first, second, text in (
        (as_safetensors({"moment": torch.ones(n + 1)}), vec, "expected"),
        (pickle.dumps(_Evil()), vec, "Accepted formats"),
        (vec, as_safetensors({"moment": -torch.ones(n)}), "negative"),
        (as_safetensors({"moment": torch.full((n,), float("nan"))}), vec, "NaN"),
        (vec, b"trunc", ""),
    ):
        r = await swag(clients[0], first, second)
        assert r.status_code == 400 and text in r.json()["detail"], r.text
    assert (await swag(clients[0], vec, vec, round_=7)).status_code == 400
    outsider = await make_user("outsider", client=True)
    assert (await swag(outsider, vec, vec)).status_code == 403
    # torch.save(tensor) and a TorchScript module holding one tensor are accepted
    r = await swag(clients[0], _torch_save(torch.ones(n)), _torch_save(torch.ones(n) * 2))
    assert r.status_code == 201 and r.json()["detail"] == "SWAG Statistic Accepted", r.text
    detail = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
    assert detail["state"] == "S"


@pytest.mark.postgres_only
async def test_concurrent_last_uploads_aggregate_exactly_once(client, alice, make_user, app):
    clients, model_id, training_id, state = await _started(
        client, alice, make_user, n=4, options={"skip_model_tests": True}
    )
    calls: list[int] = []

    async def count(_session, _training, round_):
        calls.append(round_)

    training_hooks.ROUND_AGGREGATED.add(count)
    try:
        await post_update(client, clients[0].headers, model_id, as_safetensors(shifted(state, 1.0)), 0)
        await post_update(client, clients[1].headers, model_id, as_safetensors(shifted(state, 1.0)), 0)
        results = await asyncio.gather(
            *(
                post_update(client, c.headers, model_id, as_safetensors(shifted(state, 2.0)), 0)
                for c in clients[2:]
            )
        )
        assert [r.status_code for r in results] == [201, 201]
        await wait_training(client, alice.headers, training_id, lambda b: b["round"] == 1)
        await asyncio.sleep(0.3)
        body = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
        assert body["round"] == 1 and calls == [0]
        async with app.state.sessionmaker() as session:
            rows = (
                await session.execute(
                    select(func.count())
                    .select_from(GlobalModelRound)
                    .where(GlobalModelRound.model_id == model_id)
                )
            ).scalar_one()
            assert rows == 2
            starts = (
                await session.execute(
                    select(func.count())
                    .select_from(Notification)
                    .where(Notification.notification_type == "UPDATE_ROUND_START")
                )
            ).scalar_one()
            assert starts == 8  # 4 clients × rounds 0 and 1
    finally:
        training_hooks.ROUND_AGGREGATED.remove(count)


async def test_health_answers_during_a_large_aggregation(client, alice, make_user):
    big = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))  # 2.1M params, 8 MB
    initial = scripted_bytes(big)
    clients = [await make_user(f"h{i}", client=True) for i in range(3)]
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(
        client,
        alice.headers,
        model_id,
        [c.id for c in clients],
        options={"skip_model_tests": True},
        target_num_updates=1,
    )
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    state = state_of(initial)
    for i, c in enumerate(clients):
        r = await post_update(client, c.headers, model_id, as_safetensors(shifted(state, float(i))), 0)
        assert r.status_code == 201
    latencies = []
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 60
    while True:
        start = loop.time()
        assert (await client.get("/health")).status_code == 200
        latencies.append(loop.time() - start)
        body = (await client.get(f"/api/trainings/{training_id}/", headers=alice.headers)).json()
        assert body["state"] != "E", body.get("error_reason")
        if body["state"] == "C":
            break
        assert loop.time() < give_up, f"still {body['state']} after 60 s"
        await asyncio.sleep(0.01)
    assert max(latencies) < 1.0, latencies
