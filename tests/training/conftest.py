"""Fixtures of the training tests: tiny TorchScript models and API helpers."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save as safetensors_save

from flplatform.settings import Settings


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        self.fc2 = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyNet()


def scripted_bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def state_of(data: bytes) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in torch.jit.load(io.BytesIO(data)).state_dict().items()}


def shifted(state: dict[str, torch.Tensor], delta: float) -> dict[str, torch.Tensor]:
    """A deterministic 'training step': float tensors + delta, integer buffers + 1."""
    return {k: (v + delta if v.is_floating_point() else v + 1) for k, v in state.items()}


def as_safetensors(state: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in state.items()})


def fedavg(states: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, torch.Tensor]:
    """Independent FedAvg for the assertions (float64, integer buffers rounded)."""
    total = float(sum(sizes))
    out = {}
    for key, ref in states[0].items():
        acc = sum(s[key].to(torch.float64) * n for s, n in zip(states, sizes, strict=False)) / total
        out[key] = acc.to(ref.dtype) if ref.is_floating_point() else torch.round(acc).to(ref.dtype)
    return out


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        notification_backoff_seconds=0.01,
        notification_max_attempts=2,
        notification_timeout_seconds=2.0,
        training_sweep_interval_seconds=0.05,
    )


async def upload_global(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    data: bytes | None = None,
    *,
    kind: str = "GLOBAL",
    **fields: Any,
) -> str:
    data = data if data is not None else scripted_bytes(tiny_net())
    form = {"name": "tiny", "description": "a tiny net", "type": kind, **fields}
    r = await client.post("/api/models/", headers=headers, data=form, files={"model_file": ("m.pt", data)})
    assert r.status_code == 201, r.text
    assert r.json()["detail"] == "Model Upload Accepted"
    return r.json()["model_id"]


async def create_training(
    client: httpx.AsyncClient, headers: dict[str, str], model_id: str, clients: list[str], **fields: Any
) -> str:
    body = {
        "model_id": model_id,
        "target_num_updates": 2,
        "metric_names": ["loss"],
        "aggregation_method": "FedAvg",
        "clients": clients,
        **fields,
    }
    r = await client.post("/api/trainings/", headers=headers, json=body)
    assert r.status_code == 201, r.text
    assert r.json()["detail"] == "Training created successfully!"
    return r.json()["training_id"]


async def post_update(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    model_id: str,
    data: bytes,
    round_: int,
    sample_size: int = 10,
    metrics: dict[str, Any] | None = None,
) -> httpx.Response:
    form: dict[str, Any] = {"round": str(round_), "sample_size": str(sample_size)}
    if metrics:
        form["metric_names"] = list(metrics)
        form["metric_values"] = [str(v) for v in metrics.values()]
    return await client.post(
        f"/api/models/{model_id}/", headers=headers, data=form, files={"model_file": ("u.pt", data)}
    )
