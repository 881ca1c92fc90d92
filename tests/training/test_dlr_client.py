"""A client written for the DLR platform runs a multi-round FedAvg training unchanged.

Everything here is what the DLR client (DLR-KI/fl-demonstrator-client) does on the wire:
self-registration with ``POST /api/users/`` (the token comes back in the response),
``Token``, HTTP Basic and Basic-with-the-token-as-user-name authentication, a notification
endpoint answering 200/202 like its ``client_server.py``, TorchScript models downloaded and
uploaded whole (``torch.jit.save`` of the trained module) as multipart ``model_file`` +
``round`` + ``sample_size`` (+ the ``owner`` field it sends and the server ignores) with
repeated ``metric_names``/``metric_values``, and test metrics posted on the new global model.
Local training is real (SGD steps on the client's data); the test checks every round's global
weights against an independent FedAvg of what the clients uploaded, that the loss falls, and
that the actor is billed exactly as the price list says, once per round (issue 9).
"""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
import torch

from flplatform import billing
from flplatform.billing.prices import set_price
from flplatform.db import create_engine, create_sessionmaker
from flplatform.settings import Settings
from tests.training.conftest import fedavg, scripted_bytes, state_of, tiny_net
from tests.training.live import live_server, notification_servers, wait_until

pytestmark = pytest.mark.slow

ROUNDS = 3


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _prices_and_top_up(db_url: str, actor_id: str, top_up: int) -> None:
    """The admin's part, straight in the database: a price list and the actor's deposit."""

    async def run() -> None:
        engine = create_engine(db_url)
        async with create_sessionmaker(engine)() as session:
            await set_price(session, "training_update", UPDATE_PRICE, by=None)
            await set_price(session, "training_sample_epoch", SAMPLE_EPOCH_PRICE, by=None)
            await set_price(session, "training_reserve_samples", 200, by=None)
            await billing.top_up(session, user_id=uuid.UUID(actor_id), amount=top_up, key=f"dlr:{actor_id}")
            await session.commit()
        await engine.dispose()

    asyncio.run(run())


def _usd(text: str) -> int:
    return int(Decimal(text) * 10**8)


UPDATE_PRICE, SAMPLE_EPOCH_PRICE = _usd("0.5"), _usd("0.001")  # minor units (10⁻⁸ USD)


def _loss_and_accuracy(
    module: torch.jit.ScriptModule, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    module.eval()
    with torch.no_grad():
        out = module(x)
    return float(torch.nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


@dataclass
class DLRClient:
    """One participant as the DLR client behaves; ``auth`` is "token", "basic" or "basic-token"."""

    name: str
    auth: str
    samples: int
    seed: int
    base_url: str = ""
    user_id: str = ""
    token: str = ""
    password: str = "dlr-client-password"
    uploads: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    received: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def http(self) -> httpx.Client:
        if self.auth == "token":
            return httpx.Client(
                base_url=self.base_url, headers={"Authorization": f"Token {self.token}"}, timeout=30
            )
        credentials = (self.name, self.password) if self.auth == "basic" else (self.token, "")
        return httpx.Client(base_url=self.base_url, auth=credentials, timeout=30)

    def on_notification(self, body: bytes, headers: Any) -> int:
        import json

        message = json.loads(body)
        kind = message["notification_type"]
        self.received.append(kind)
        if kind in ("UPDATE_ROUND_START", "MODEL_TEST_ROUND"):
            # client_server.py answers 202 at once and spawns `main.py train|test`.
            threading.Thread(target=self._run, args=(kind, message["body"]), daemon=True).start()
            return 202
        return 200

    def _run(self, kind: str, body: dict[str, Any]) -> None:
        try:
            with self.http() as http:
                model_id, round_ = body["global_model_uuid"], body["round"]
                r = http.get(f"/api/models/{model_id}/")
                assert r.status_code == 200, r.text
                module = torch.jit.load(io.BytesIO(r.content))
                x, y = _data(self.seed, self.samples)
                if kind == "MODEL_TEST_ROUND":
                    loss, accuracy = _loss_and_accuracy(module, x, y)
                    r = http.post(
                        f"/api/models/{model_id}/metrics/",
                        data={
                            "metric_names": ["loss", "accuracy"],
                            "metric_values": [str(loss), str(accuracy)],
                        },
                    )
                    assert r.status_code == 201, r.text
                    return
                module.train()
                optimizer = torch.optim.SGD(module.parameters(), lr=0.2)
                for _ in range(5):
                    optimizer.zero_grad()
                    loss = torch.nn.functional.cross_entropy(module(x), y)
                    loss.backward()
                    optimizer.step()
                buffer = io.BytesIO()
                torch.jit.save(module, buffer)
                self.uploads[round_] = {k: v.detach().clone() for k, v in module.state_dict().items()}
                r = http.post(
                    f"/api/models/{model_id}/",
                    data={
                        "round": str(round_),
                        "sample_size": str(self.samples),
                        "owner": self.user_id,
                        "metric_names": ["loss"],
                        "metric_values": [str(loss.item())],
                    },
                    files={"model_file": ("model.pt", buffer.getvalue(), "application/octet-stream")},
                )
                assert r.status_code == 201 and r.json()["detail"] == "Model Update Accepted", r.text
        except Exception as exc:  # surfaced by wait_until / the final assertions
            self.errors.append(f"{self.name} {kind}: {type(exc).__name__}: {exc}")


def test_dlr_style_clients_complete_a_multi_round_fedavg_training(db_url):
    clients = [
        DLRClient("dlr-token", "token", 40, 1),
        DLRClient("dlr-basic", "basic", 80, 2),
        DLRClient("dlr-basic-token", "basic-token", 120, 3),
    ]
    settings = Settings(
        database_url=db_url,
        allow_self_registration=True,
        notification_backoff_seconds=0.01,
        notification_max_attempts=2,
        training_sweep_interval_seconds=0.05,
    )
    with live_server(settings) as base, notification_servers(clients) as endpoints:  # type: ignore[arg-type]
        anonymous = httpx.Client(base_url=base, timeout=30)
        for c in clients:
            c.base_url = base
            r = anonymous.post(
                "/api/users/",
                json={
                    "username": c.name,
                    "password": c.password,
                    "first_name": "DLR",
                    "last_name": "Client",
                    "email": f"{c.name}@example.org",
                    "message_endpoint": endpoints[c.name],
                    "actor": False,
                    "client": True,
                },
            )
            assert r.status_code == 201, r.text
            c.user_id, c.token = r.json()["id"], r.json()["token"]
            with c.http() as http:  # every authentication style works
                me = http.get("/api/users/myself/")
                assert me.status_code == 200 and me.json()["username"] == c.name, me.text
        r = anonymous.post(
            "/api/users/",
            json={"username": "dlr-actor", "password": "actor-password-1", "actor": True, "client": False},
        )
        assert r.status_code == 201, r.text
        actor = httpx.Client(
            base_url=base, headers={"Authorization": f"Token {r.json()['token']}"}, timeout=30
        )
        _prices_and_top_up(db_url, r.json()["id"], _usd("100"))
        assert anonymous.get("/api/users/myself/").status_code == 401

        initial = scripted_bytes(tiny_net(7))
        r = actor.post(
            "/api/models/",
            data={"name": "dlr-net", "description": "TinyNet", "input_shape": ["None", "4"]},
            files={"model_file": ("model.pt", initial)},
        )
        assert r.status_code == 201 and r.json()["detail"] == "Model Upload Accepted", r.text
        model_id = r.json()["model_id"]
        r = actor.post(
            "/api/trainings/",
            json={
                "model_id": model_id,
                "target_num_updates": ROUNDS,
                "metric_names": ["loss", "accuracy"],
                "aggregation_method": "FedAvg",
                "uncertainty_method": "NONE",
                "options": {},
                "clients": [c.user_id for c in clients],
            },
        )
        assert r.status_code == 201 and r.json()["detail"] == "Training created successfully!", r.text
        training_id = r.json()["training_id"]
        r = actor.post(f"/api/trainings/{training_id}/start/")
        assert r.status_code == 202 and r.json()["detail"] == "Training started!", r.text
        final = wait_until(
            actor, training_id, lambda b: b["state"] in ("C", "E"), timeout=90, clients=clients
        )  # type: ignore[arg-type]
        assert final["state"] == "C" and final["round"] == ROUNDS, final

        # Every round's global model is an independent FedAvg of the three uploads of that round.
        sizes = [c.samples for c in clients]
        test_x, test_y = _data(99, 500)
        losses = []
        for round_ in range(ROUNDS + 1):
            r = actor.get(f"/api/models/{model_id}/", params={"round": round_})
            assert r.status_code == 200, r.text
            if round_ > 0:
                expected = fedavg([c.uploads[round_ - 1] for c in clients], sizes)
                got = state_of(r.content)
                for key, value in expected.items():
                    assert torch.allclose(got[key].double(), value.double(), atol=1e-5), (round_, key)
            losses.append(_loss_and_accuracy(torch.jit.load(io.BytesIO(r.content)), test_x, test_y)[0])
        assert losses[-1] < losses[0], losses
        # Test-round metrics: one loss and one accuracy per client per round, at step = round.
        metrics = actor.get(f"/api/models/{model_id}/metrics/").json()
        reported = sorted((m["step"], m["reporter"]) for m in metrics if m["key"] == "accuracy")
        assert reported == sorted((s, c.user_id) for s in range(1, ROUNDS + 1) for c in clients)
        # Billing: per round 3 updates × 0.5 + 0.001 × 240 samples (× 1 epoch), charged once per round.
        per_round = 3 * UPDATE_PRICE + SAMPLE_EPOCH_PRICE * sum(sizes)
        operations = actor.get("/api/billing/operations/", params={"kind": "training"}).json()
        assert sorted(op["round"] for op in operations) == list(range(ROUNDS)), operations
        assert all(
            _usd(op["amount"]) == per_round and op["count_of_lines"] == sum(sizes) for op in operations
        )
        balance = {b["currency"]: b for b in actor.get("/api/billing/balance/").json()["balances"]}["USD"]
        assert (
            _usd(balance["available"]) == _usd("100") - ROUNDS * per_round and _usd(balance["held"]) == 0
        ), balance
        # The clients see the training and their local models (DLR routes).
        for c in clients:
            with c.http() as http:
                assert [t["id"] for t in http.get("/api/users/trainings/").json()] == [training_id]
                latest = http.get(f"/api/trainings/{training_id}/models/latest/").json()
                assert {m["id"] for m in latest} >= {model_id}
        actor.close()
        anonymous.close()
    for c in clients:
        assert not c.errors, c.errors
        assert c.received[0] == "TRAINING_START" and c.received[-1] == "TRAINING_FINISHED", c.received
        assert (
            c.received.count("UPDATE_ROUND_START") == ROUNDS
            and c.received.count("MODEL_TEST_ROUND") == ROUNDS
        )
