"""A real flplatform server (uvicorn on a free port, in this test's event loop) with a
bootstrapped admin, plus one local notification endpoint for the participants."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import torch

from flplatform.app import create_app
from flplatform.client import FLPlatformAPI, NotificationEndpoint, Participant, digits, dump_module
from flplatform.client.embedded import EmbeddedServer
from flplatform.settings import Settings

ADMIN, ADMIN_PASSWORD = "root", "root-password-123"


@dataclasses.dataclass
class Platform:
    url: str
    admin: FLPlatformAPI
    endpoint: NotificationEndpoint
    apis: list[FLPlatformAPI] = dataclasses.field(default_factory=list)
    participants: list[Participant] = dataclasses.field(default_factory=list)

    def api(self, token: str) -> FLPlatformAPI:
        api = FLPlatformAPI(self.url, token=token, timeout=30)
        self.apis.append(api)
        return api


@pytest.fixture
async def platform(db_url: str) -> AsyncIterator[Platform]:
    settings = Settings(
        database_url=db_url,
        admin_username=ADMIN,
        admin_password=ADMIN_PASSWORD,
        admin_email="root@example.org",
        training_sweep_interval_seconds=0.2,
        notification_backoff_seconds=0.1,
    )
    # Participants train concurrently in threads: one intra-op thread each avoids oversubscribing the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = EmbeddedServer(create_app(settings))
    await server.start()
    endpoint = NotificationEndpoint()
    await endpoint.start()
    admin = FLPlatformAPI(server.url, username=ADMIN, password=ADMIN_PASSWORD, timeout=30)
    platform = Platform(server.url, admin, endpoint)
    try:
        yield platform
    finally:
        for participant in platform.participants:
            await participant.aclose()
        for api in platform.apis:
            await api.aclose()
        await admin.aclose()
        await endpoint.stop()
        await server.stop()
        torch.set_num_threads(threads)


@dataclasses.dataclass
class Federation:
    training_id: str
    model_id: str
    actor: FLPlatformAPI
    participants: list[Participant]
    held_out: digits.Shard
    # (participant name, round) -> (sample size, trained state dict) as uploaded
    updates: dict[tuple[str, int], tuple[int, dict[str, torch.Tensor]]]
    # (participant name, round) -> (mu, model id the round started from)
    contexts: dict[tuple[str, int], tuple[float | None, str]]


async def build_federation(
    platform: Platform,
    *,
    clients: int,
    rounds: int,
    method: str = "FedAvg",
    options: dict[str, Any] | None = None,
    upload_format: str = "torchscript",
    polling: Sequence[int] = (),
    verify_signatures: bool = True,
    seed: int = 0,
    epochs: int = 2,
) -> Federation:
    """Actor + ``clients`` participants on non-IID digits shards; the training is created, not started.
    Participants whose index is in ``polling`` get no message endpoint (they poll)."""
    data = digits.load_digits_tensors()
    pool, held_out = digits.train_test_split(data, 0.2, seed)
    shards = digits.dirichlet_partition(pool, clients, alpha=0.5, seed=seed)
    await platform.admin.login()
    actor_user = await platform.admin.create_user("actor", secrets.token_urlsafe(12), actor=True)
    actor = platform.api(actor_user["token"])
    updates: dict[tuple[str, int], tuple[int, dict[str, torch.Tensor]]] = {}
    contexts: dict[tuple[str, int], tuple[float | None, str]] = {}
    participants, ids = [], []
    for index, shard in enumerate(shards):
        name = f"client-{index}"
        local_train, local_test = digits.train_test_split(shard, 0.2, index)
        trainer = digits.LocalTrainer(local_train, local_test, epochs=epochs, seed=index)

        def train(module: torch.nn.Module, round_: int, ctx: Any, trainer=trainer, name=name) -> Any:
            sample_size, metrics = trainer.train(module, round_, ctx)
            updates[(name, round_)] = (
                sample_size,
                {k: v.detach().clone() for k, v in module.state_dict().items()},
            )
            contexts[(name, round_)] = (ctx.mu, ctx.model_id)
            return sample_size, metrics

        endpoint_url = None if index in polling else f"{platform.endpoint.public_url}/{name}/"
        user = await platform.admin.create_user(
            name,
            secrets.token_urlsafe(12),
            client=True,
            message_endpoint=endpoint_url,
            notify_client_removed=True,
        )
        participant = Participant(
            platform.api(user["token"]),
            train,
            trainer.test,
            name=name,
            upload_format=upload_format,  # type: ignore[arg-type]
            template=digits.DigitsCNN() if upload_format == "safetensors" else None,
        )
        if verify_signatures and endpoint_url is not None:
            await participant.fetch_signing_key()
        if endpoint_url is not None:
            platform.endpoint.add(participant)
        participants.append(participant)
        platform.participants.append(participant)
        ids.append(user["id"])
    model_id = await actor.upload_model(
        dump_module(digits.make_model(seed)),
        name="digits",
        description="test CNN",
        input_shape=digits.INPUT_SHAPE,
    )
    training_id = await actor.create_training(
        model_id, target_num_updates=rounds, clients=ids, aggregation_method=method, options=options or {}
    )
    return Federation(training_id, model_id, actor, participants, held_out, updates, contexts)


def fedavg(states: Sequence[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Independent sample-size-weighted mean, in float64."""
    total = sum(n for n, _ in states)
    return {
        key: sum(n * state[key].double() for n, state in states) / total  # type: ignore[misc]
        for key in states[0][1]
    }
