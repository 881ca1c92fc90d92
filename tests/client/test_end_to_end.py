"""The SDK against a real server over real HTTP: notifications to real local endpoints
(signatures verified), downloads, uploads, test rounds, on both databases."""

from __future__ import annotations

import asyncio

import pytest
import torch

from flplatform.client import digits, load_module
from tests.client.conftest import Platform, build_federation, fedavg

pytestmark = pytest.mark.slow


async def _run(federation, timeout: float = 90.0) -> dict:
    await federation.actor.start_training(federation.training_id)
    final = await federation.actor.wait_for_training(federation.training_id, timeout=timeout, interval=0.1)
    await asyncio.gather(
        *(p.wait_finished(federation.training_id, timeout=20) for p in federation.participants)
    )
    return final


async def test_fedavg_end_to_end_matches_an_independent_fedavg(platform: Platform):
    rounds, clients = 3, 3
    fed = await build_federation(platform, clients=clients, rounds=rounds)
    final = await _run(fed)
    assert final["state"] == "C", final.get("error_reason")

    for participant in fed.participants:
        run = participant.run_for(fed.training_id)
        assert run.errors == []
        assert run.outcome == "finished"
        assert run.rounds("train") == list(range(rounds))
        assert run.rounds("test") == list(range(1, rounds + 1))

    # Every round's global weights are the sample-size-weighted mean of that round's uploads.
    names = [p.name for p in fed.participants]
    for round_ in range(rounds):
        expected = fedavg([fed.updates[(name, round_)] for name in names])
        module = load_module(await fed.actor.download_model(fed.model_id, round=round_ + 1))
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-6)
    latest = load_module(await fed.actor.download_model(fed.model_id))
    initial = load_module(await fed.actor.download_model(fed.model_id, round=0))
    assert torch.equal(next(latest.parameters()), next(module.parameters()))

    # The global model learned: held-out accuracy and loss improve over the initial weights.
    before, after = digits.evaluate(initial, fed.held_out), digits.evaluate(latest, fed.held_out)
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert after["loss"] < before["loss"]

    # Every participant's test metrics reached the server at each tested round.
    metrics = await fed.actor.get_metrics(fed.model_id)
    accuracy_rows = [m for m in metrics if m["key"] == "accuracy"]
    assert len(accuracy_rows) == clients * rounds
    assert {m["step"] for m in accuracy_rows} == set(range(1, rounds + 1))


async def test_fedprox_safetensors_uploads_and_a_polling_client(platform: Platform):
    """mu reaches the training function; weight-only safetensors updates; one client without an endpoint."""
    fed = await build_federation(
        platform,
        clients=3,
        rounds=2,
        method="FedProx",
        options={"mu": 0.5},
        upload_format="safetensors",
        polling=[2],
        epochs=1,
    )
    poller = fed.participants[2]
    polling = asyncio.create_task(poller.poll(fed.training_id, interval=0.1, timeout=90))
    final = await _run(fed)
    run = await asyncio.wait_for(polling, 30)
    assert final["state"] == "C", final.get("error_reason")
    assert run.outcome == "finished" and run.errors == []
    assert run.rounds("train") == [0, 1] and run.rounds("test") == [1, 2]
    assert {mu for mu, _ in fed.contexts.values()} == {0.5}
    expected = fedavg([fed.updates[(p.name, 1)] for p in fed.participants])
    module = load_module(await fed.actor.download_model(fed.model_id))
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-6)


async def test_feddc_clients_continue_from_redistributed_models_and_upload_to_the_global_model(
    platform: Platform,
):
    """d=1, b=2, 2 rounds: round 1 starts from another client's local model (a derangement),
    the upload still goes to the global model, and the aggregate is the FedAvg of round 1."""
    fed = await build_federation(
        platform,
        clients=3,
        rounds=2,
        method="FedDC",
        options={"daisy_chain_period": 1, "aggregation_period": 2},
        epochs=1,
    )
    final = await _run(fed)
    assert final["state"] == "C", final.get("error_reason")
    names = [p.name for p in fed.participants]
    started_from = {name: fed.contexts[(name, 1)][1] for name in names}
    assert all(model_id != fed.model_id for model_id in started_from.values())
    assert len(set(started_from.values())) == len(names)
    assert all(fed.contexts[(name, 0)][1] == fed.model_id for name in names)
    # A derangement: every client continues from another client's round-0 update, never its own.
    own = {
        p.name: next(
            r.uploaded_model_id
            for r in p.run_for(fed.training_id).records
            if r.kind == "train" and r.round == 0
        )
        for p in fed.participants
    }
    assert set(started_from.values()) == set(own.values())
    assert all(started_from[name] != own[name] for name in names)
    for participant in fed.participants:
        assert participant.run_for(fed.training_id).errors == []
    expected = fedavg([fed.updates[(name, 1)] for name in names])
    module = load_module(await fed.actor.download_model(fed.model_id))
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-6)
