"""A 3-round SWAG training over real HTTP (uvicorn, clients with notification endpoints),
then inference on its SWAG model: the server's prediction equals the SWAG-diagonal formula
applied in the test to the downloaded global model and moments."""

from __future__ import annotations

import io

import httpx
import pytest
import torch
from safetensors.torch import load as safetensors_load

from flplatform.settings import Settings
from tests.training.conftest import scripted_bytes, tiny_net
from tests.training.live import FakeClient, live_server, notification_servers, setup_clients, wait_until

pytestmark = pytest.mark.slow

X = [[0.5, -1.0, 2.0, 0.1], [1.0, 1.0, -0.5, 0.0], [0.0, 0.3, 0.2, -2.0]]
N, SEED = 25, 11


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _swag_for(index: int):
    def moments(module: torch.nn.Module, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = _flat(module) + 0.05 * (index + 1)
        return first, first**2 + 0.002 * (index + 1) * (round_ + 1)

    return moments


def _expected(
    module_bytes: bytes, first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_s = E[θ] + sqrt(clamp(E[θ²] − E[θ]², 1e-30)) · z_s, z_s from the seeded generator, s = 1..N."""
    module = torch.jit.load(io.BytesIO(module_bytes)).eval()
    std = (second.double() - first.double() ** 2).clamp_min(1e-30).sqrt()
    generator = torch.Generator().manual_seed(SEED)
    outputs = []
    with torch.no_grad():
        for _ in range(N):
            theta = (
                first.double() + std * torch.randn(first.shape, generator=generator, dtype=torch.float64)
            ).float()
            torch.nn.utils.vector_to_parameters(theta, module.parameters())
            outputs.append(module(torch.tensor(X)))
    stacked = torch.stack(outputs)
    return stacked.mean(0), stacked.var(0)


def test_three_round_swag_training_then_inference(db_url):
    clients = [
        FakeClient(name=f"w{i}", base_url="", sample_size=10 * (i + 1), swag=_swag_for(i)) for i in range(2)
    ]
    settings = Settings(database_url=db_url, notification_backoff_seconds=0.01, notification_max_attempts=2,
                        training_sweep_interval_seconds=0.05)  # fmt: skip
    with live_server(settings) as base, notification_servers(clients) as endpoints:
        for client in clients:
            client.base_url = base
        _, actor_token = setup_clients(db_url, base, clients, endpoints)
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Token {actor_token}"}, timeout=60
        ) as http:
            upload = http.post(
                "/api/models/",
                data={"name": "swag net", "description": "", "type": "SWAG", "input_shape": ["None", "4"]},
                files={"model_file": ("net.pt", scripted_bytes(tiny_net(5)))},
            )
            assert upload.status_code == 201, upload.text
            model_id = upload.json()["model_id"]
            created = http.post("/api/trainings/", json={
                "model_id": model_id, "target_num_updates": 3, "metric_names": [],
                "aggregation_method": "FedAvg", "uncertainty_method": "SWAG",
                "options": {"uncertainty": {"N": N, "seed": SEED}},
                "clients": [c.user_id for c in clients]})  # fmt: skip
            assert created.status_code == 201, created.text
            training_id = created.json()["training_id"]
            assert http.post(f"/api/trainings/{training_id}/start/").status_code == 202
            final = wait_until(
                http, training_id, lambda b: b["state"] in ("C", "E"), timeout=90, clients=clients
            )
            assert final["state"] == "C", final

            # Method and options come from the training; N independent draws.
            response = http.post("/api/inference/", json={"model_id": model_id, "model_input": X})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["uncertainty_method"] == "SWAG" and body["samples"] == N and body["round"] == 3

            module_bytes = http.get(f"/api/models/{model_id}/").content
            first = safetensors_load(
                http.get(f"/api/models/{model_id}/swag/", params={"moment": "first"}).content
            )
            second = safetensors_load(
                http.get(f"/api/models/{model_id}/swag/", params={"moment": "second"}).content
            )
            mean, variance = _expected(module_bytes, first["moment"], second["moment"])
            assert torch.allclose(torch.tensor(body["inference"]), mean, atol=1e-5)
            assert torch.allclose(torch.tensor(body["uncertainty"]["variance"]), variance, atol=1e-5)
            assert torch.all(variance > 0)

            # The participants may query it too, in binary, with their own options.
            with clients[0].http() as participant:
                binary = participant.post(
                    "/api/inference/",
                    data={"model_id": model_id, "options": '{"N": 4, "softmax": true}'},
                    files={"model_input": ("x.json", str(X).encode())},
                )
                assert binary.status_code == 200, binary.text
                tensors = safetensors_load(binary.content)
                assert tensors["inference"].shape == (3, 2) and "uncertainty.mutual_info" in tensors
                metadata = participant.get(f"/api/models/{model_id}/metadata/").json()
                assert metadata["type"] == "SWAG" and metadata["has_swag_moments"] is True
                assert metadata["uncertainty_method"] == "SWAG" and metadata["output_shape"] == [1, 2]
    for client in clients:
        assert not client.errors
        kinds = [m["notification_type"] for m in client.received]
        assert kinds.count("SWAG_ROUND_START") == 3
