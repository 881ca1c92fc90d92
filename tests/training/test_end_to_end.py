"""End to end over real HTTP: uvicorn server, clients with real notification endpoints."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load as safetensors_load

from flplatform.settings import Settings
from tests.training.conftest import fedavg, scripted_bytes, shifted, state_of, tiny_net
from tests.training.live import FakeClient, live_server, notification_servers, setup_clients, wait_until

pytestmark = pytest.mark.slow


def _settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        notification_backoff_seconds=0.01,
        notification_max_attempts=2,
        training_sweep_interval_seconds=0.05,
    )


def _upload(http: httpx.Client, kind: str = "GLOBAL") -> tuple[str, bytes]:
    initial = scripted_bytes(tiny_net(3))
    r = http.post(
        "/api/models/",
        data={"name": "net", "description": "", "type": kind, "input_shape": ["None", "4"]},
        files={"model_file": ("net.pt", initial)},
    )
    assert r.status_code == 201, r.text
    return r.json()["model_id"], initial


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].to(torch.float64), b[k].to(torch.float64), atol=1e-5), k


def test_fedavg_three_rounds_four_clients(db_url):
    sizes = [10, 20, 30, 40]
    clients = [
        FakeClient(
            name=f"c{i}",
            base_url="",
            sample_size=n,
            train=(lambda s, r, i=i: shifted(s, 0.1 * (i + 1) * (r + 1))),
            upload_format="torchscript" if i % 2 else "safetensors",
        )
        for i, n in enumerate(sizes)
    ]
    settings = _settings(db_url)
    with live_server(settings) as base, notification_servers(clients) as endpoints:
        for c in clients:
            c.base_url = base
        _, actor_token = setup_clients(db_url, base, clients, endpoints)
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Token {actor_token}"}, timeout=30
        ) as http:
            model_id, initial = _upload(http)
            r = http.post(
                "/api/trainings/",
                json={
                    "model_id": model_id,
                    "target_num_updates": 3,
                    "metric_names": ["accuracy"],
                    "aggregation_method": "FedProx",
                    "options": {"mu": 0.01},
                    "clients": [c.user_id for c in clients],
                },
            )
            assert r.status_code == 201, r.text
            training_id = r.json()["training_id"]
            assert http.post(f"/api/trainings/{training_id}/start/").status_code == 202
            final = wait_until(
                http, training_id, lambda b: b["state"] in ("C", "E"), timeout=60, clients=clients
            )
            assert final["state"] == "C", final
            assert final["round"] == 3 and final["mu"] == 0.01
            expected = state_of(initial)
            for round_ in range(3):
                expected = fedavg([shifted(expected, 0.1 * (i + 1) * (round_ + 1)) for i in range(4)], sizes)
                r = http.get(f"/api/models/{model_id}/", params={"round": round_ + 1})
                _close(state_of(r.content), expected)
            got = state_of(http.get(f"/api/models/{model_id}/").content)
            _close(got, expected)
            # test metrics at step = round on the global model, one per client per round
            metrics = http.get(f"/api/models/{model_id}/metrics/").json()
            assert sorted({(m["step"], m["reporter"]) for m in metrics if m["key"] == "accuracy"}) == sorted(
                (s, c.user_id) for s in (1, 2, 3) for c in clients
            )
    for c in clients:
        assert c.bad_signatures == 0 and not c.errors
        kinds = [m["notification_type"] for m in c.received]
        assert kinds[0] == "TRAINING_START"
        assert kinds.count("UPDATE_ROUND_START") == 3 and kinds.count("MODEL_TEST_ROUND") == 3
        assert kinds[-1] == "TRAINING_FINISHED"
        starts = [m for m in c.received if m["notification_type"] == "UPDATE_ROUND_START"]
        assert [m["body"]["round"] for m in starts] == [0, 1, 2]
        assert all(m["body"]["mu"] == 0.01 and m["training_uuid"] == training_id for m in starts)


def test_feddc_daisy_chains_and_aggregates_every_b_rounds(db_url):
    names = ["d0", "d1", "d2"]
    clients = [
        FakeClient(
            name=n,
            base_url="",
            sample_size=10 * (i + 1),
            train=(lambda s, r, i=i: shifted(s, 0.01 * (i + 1) + r)),
        )
        for i, n in enumerate(names)
    ]
    with live_server(_settings(db_url)) as base, notification_servers(clients) as endpoints:
        for c in clients:
            c.base_url = base
        _, actor_token = setup_clients(db_url, base, clients, endpoints)
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Token {actor_token}"}, timeout=30
        ) as http:
            model_id, initial = _upload(http)
            r = http.post(
                "/api/trainings/",
                json={
                    "model_id": model_id,
                    "target_num_updates": 4,
                    "metric_names": [],
                    "aggregation_method": "FedDC",
                    "options": {"daisy_chain_period": 1, "aggregation_period": 2, "skip_model_tests": True},
                    "clients": [c.user_id for c in clients],
                },
            )
            assert r.status_code == 201, r.text
            training_id = r.json()["training_id"]
            detail = http.get(f"/api/trainings/{training_id}/").json()
            assert detail["target_num_updates"] == 4  # 4 × period 1
            assert http.post(f"/api/trainings/{training_id}/start/").status_code == 202
            final = wait_until(
                http, training_id, lambda b: b["state"] in ("C", "E"), timeout=60, clients=clients
            )
            assert final["state"] == "C", final
            info = http.get(f"/api/models/{model_id}/info/").json()
            assert info["rounds"] == [0, 2, 4]  # the global model changed only at the aggregation rounds
            owner_of = {local_id: c.user_id for c in clients for (_, local_id, _) in c.uploads}
            uploads = {(c.user_id, r_): s for c in clients for (r_, _, s) in c.uploads}
            for c in clients:
                downloads = dict(c.downloads)
                assert downloads[0] == model_id and downloads[2] == model_id
                for round_ in (1, 3):  # derangement rounds: another client's local model
                    assert downloads[round_] in owner_of
                    assert owner_of[downloads[round_]] != c.user_id
            sizes = {c.user_id: c.sample_size for c in clients}
            for round_, after in ((1, 2), (3, 4)):
                expected = fedavg(
                    [uploads[(c.user_id, round_)] for c in clients], [sizes[c.user_id] for c in clients]
                )
                _close(
                    state_of(http.get(f"/api/models/{model_id}/", params={"round": after}).content), expected
                )
    for c in clients:
        assert c.bad_signatures == 0 and not c.errors


def _flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_swag_training_aggregates_moments(db_url):
    def swag_for(i: int):
        def _swag(module: torch.nn.Module, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
            first = _flat_params(module) + 0.1 * (i + 1)
            return first, first**2 + 0.01 * (i + 1)

        return _swag

    clients = [
        FakeClient(name=f"s{i}", base_url="", sample_size=10 * (i + 1), swag=swag_for(i)) for i in range(2)
    ]
    with live_server(_settings(db_url)) as base, notification_servers(clients) as endpoints:
        for c in clients:
            c.base_url = base
        _, actor_token = setup_clients(db_url, base, clients, endpoints)
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Token {actor_token}"}, timeout=30
        ) as http:
            model_id, _ = _upload(http, "SWAG")
            r = http.post(
                "/api/trainings/",
                json={
                    "model_id": model_id,
                    "target_num_updates": 2,
                    "metric_names": [],
                    "aggregation_method": "FedAvg",
                    "uncertainty_method": "SWAG",
                    "clients": [c.user_id for c in clients],
                },
            )
            assert r.status_code == 201, r.text
            training_id = r.json()["training_id"]
            r = http.post(f"/api/trainings/{training_id}/start/")
            assert r.status_code == 202, r.text
            final = wait_until(
                http, training_id, lambda b: b["state"] in ("C", "E"), timeout=60, clients=clients
            )
            assert final["state"] == "C", final
            module_bytes = http.get(f"/api/models/{model_id}/").content  # SWAG models download fine
            assert http.get(f"/api/models/{model_id}/info/").json()["has_swag_moments"] is True
            # moments of the last SWAG round were computed on the round-2 global model
            params = _flat_params(
                torch.jit.load(
                    __import__("io").BytesIO(
                        http.get(f"/api/models/{model_id}/", params={"round": 2}).content
                    )
                )
            )
            assert len(module_bytes) > 0
            firsts = [params + 0.1 * (i + 1) for i in range(2)]
            seconds = [f**2 + 0.01 * (i + 1) for i, f in enumerate(firsts)]
            exp_first = (firsts[0] * 10 + firsts[1] * 20) / 30
            exp_second = (seconds[0] * 10 + seconds[1] * 20) / 30
            got_first = safetensors_load(
                http.get(f"/api/models/{model_id}/swag/", params={"moment": "first"}).content
            )
            got_second = safetensors_load(
                http.get(f"/api/models/{model_id}/swag/", params={"moment": "second"}).content
            )
            assert torch.allclose(got_first["moment"], exp_first, atol=1e-5)
            assert torch.allclose(got_second["moment"], exp_second, atol=1e-5)
    for c in clients:
        kinds = [m["notification_type"] for m in c.received]
        assert kinds.count("SWAG_ROUND_START") == 2 and kinds.count("MODEL_TEST_ROUND") == 2
        assert c.bad_signatures == 0 and not c.errors
