"""SDK pieces that need no server: FedProx term, serialisation, signatures, notification dispatch."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import httpx
import pytest
import torch

from flplatform.client import (
    FLPlatformAPI,
    NotificationEndpoint,
    Participant,
    dump_module,
    dump_state_dict,
    load_module,
    proximal_term,
    snapshot,
    verify_signature,
)
from flplatform.client.digits import DigitsCNN, dirichlet_partition, load_digits_tensors, train_test_split


def test_proximal_term_matches_hand_computed_value_and_gradient():
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 2.0]]))
        module.bias.copy_(torch.tensor([0.5]))
    reference = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([0.5])}
    # mu/2 * ((1-0)² + (2-1)² + (0.5-0.5)²) = 0.05 * 2 = 0.1
    term = proximal_term(module, reference, mu=0.1)
    assert term.item() == pytest.approx(0.1)
    term.backward()
    # d/dw mu/2·||w − w0||² = mu·(w − w0)
    assert torch.allclose(module.weight.grad, torch.tensor([[0.1, 0.1]]))
    assert torch.allclose(module.bias.grad, torch.tensor([0.0]))
    assert proximal_term(module, reference, mu=None).item() == 0.0
    assert proximal_term(module, reference, mu=0.0).item() == 0.0


def test_proximal_term_at_the_reference_is_zero_and_needs_every_parameter():
    module = DigitsCNN()
    assert proximal_term(module, snapshot(module), mu=1.0).item() == 0.0
    with pytest.raises(KeyError):
        proximal_term(module, {}, mu=1.0)


def test_torchscript_and_safetensors_round_trip():
    torch.manual_seed(0)
    module = DigitsCNN()
    x = torch.rand(4, 1, 8, 8)
    restored = load_module(dump_module(module))
    assert isinstance(restored, torch.jit.ScriptModule)
    assert torch.equal(restored(x), module(x))
    weights = dump_state_dict(module)
    assert not weights.startswith(b"PK")
    into = load_module(weights, DigitsCNN())
    assert torch.equal(into(x), module(x))
    with pytest.raises(ValueError, match="template"):
        load_module(weights)


def test_dirichlet_partition_is_label_skewed_seeded_and_complete():
    data = load_digits_tensors()
    train, test = train_test_split(data, 0.2, seed=1)
    assert len(train) + len(test) == len(data) == 1797
    shards = dirichlet_partition(train, 5, alpha=0.3, seed=7)
    assert sum(len(s) for s in shards) == len(train)
    assert all(len(s) >= 20 for s in shards)
    # Non-IID: some client misses some class entirely or is dominated by a few.
    assert any(min(s.label_counts()) == 0 or max(s.label_counts()) > 0.3 * len(s) for s in shards)
    again = dirichlet_partition(train, 5, alpha=0.3, seed=7)
    assert [s.label_counts() for s in again] == [s.label_counts() for s in shards]


def _signed(key: bytes, body: bytes, ts: str) -> str:
    return hmac.new(key, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()


def test_verify_signature():
    key, body, ts = b"k" * 32, b'{"a": 1}', str(int(time.time()))
    good = _signed(key, body, ts)
    assert verify_signature(key, body, good, ts) is None
    assert verify_signature(key, body, "sha256=" + good, ts) is None
    assert verify_signature(key, body + b" ", good, ts) == "bad signature"
    assert verify_signature(b"other", body, good, ts) == "bad signature"
    assert verify_signature(key, body, None, ts) is not None
    assert verify_signature(key, body, good, "x") == "malformed timestamp"
    old = str(int(time.time()) - 3600)
    assert verify_signature(key, body, _signed(key, body, old), old) == "stale timestamp"


async def _noop_train(module, round_, ctx):  # pragma: no cover - never reached in these tests
    return 1, {}


async def test_endpoint_answers_like_the_dlr_client_and_checks_signatures():
    api = FLPlatformAPI("http://127.0.0.1:9", token="unused")
    plain = Participant(api, _noop_train, name="plain")
    signed = Participant(api, _noop_train, name="signed", signing_key="secret-key")
    training = "0f8fad5b-d9cb-469f-a165-70867728950e"
    model = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
    async with NotificationEndpoint(port=0) as endpoint:
        plain_url, signed_url = endpoint.add(plain), endpoint.add(signed)
        assert plain_url.endswith("/plain/")
        async with httpx.AsyncClient() as http:

            def note(kind: str, **body: object) -> dict:
                return {"notification_type": kind, "training_uuid": training, "body": body}

            start = await http.post(plain_url, json=note("TRAINING_START", global_model_uuid=model))
            assert start.status_code == 200
            assert plain.run_for(training).global_model_id == model
            # No test / moments function: the client says it cannot, instead of stalling the round.
            assert (
                await http.post(plain_url, json=note("MODEL_TEST_ROUND", round=1, global_model_uuid=model))
            ).status_code == 501
            assert (
                await http.post(plain_url, json=note("SWAG_ROUND_START", round=1, global_model_uuid=model))
            ).status_code == 501
            assert (
                await http.post(plain_url, json=note("UPDATE_ROUND_START", global_model_uuid=model))
            ).status_code == 400
            assert (await http.post(plain_url, json=note("SOMETHING_ELSE"))).status_code == 400
            assert (await http.post(plain_url, content=b"not json")).status_code == 400
            assert (await http.post(plain_url, json={"training_uuid": "nope"})).status_code == 400
            assert (
                await http.post(endpoint.public_url + "/nobody/", json=note("TRAINING_START"))
            ).status_code == 404
            finished = await http.post(plain_url, json=note("TRAINING_FINISHED", global_model_uuid=model))
            assert finished.status_code == 200
            run = await plain.wait_finished(training, timeout=5)
            assert run.outcome == "finished"

            body = json.dumps(note("TRAINING_START", global_model_uuid=model)).encode()
            assert (await http.post(signed_url, content=body)).status_code == 401
            ts = str(time.time())
            headers = {"X-FLP-Signature": _signed(b"secret-key", body, ts), "X-FLP-Timestamp": ts}
            assert (await http.post(signed_url, content=body, headers=headers)).status_code == 200
            headers["X-FLP-Signature"] = _signed(b"wrong-key", body, ts)
            assert (await http.post(signed_url, content=body, headers=headers)).status_code == 401
    await api.aclose()


async def test_api_retries_connection_errors_then_raises(caplog):
    api = FLPlatformAPI("http://127.0.0.1:9", token="t", retries=2, backoff=0.01, connect_timeout=1)
    with caplog.at_level("WARNING", logger="flplatform.client"), pytest.raises(httpx.ConnectError):
        await api.get_training("x")
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    await api.aclose()


async def test_a_polling_client_retries_work_the_server_refused_for_now():
    """A poller can read a phase that moves on before its upload lands; a "not now" refusal
    (wrong_state / wrong_round / round_locked) is retried at the next poll, not recorded as failed."""
    from flplatform.client.api import APIError
    from flplatform.client.participant import RoundRecord

    class ScriptedAPI:
        def __init__(self) -> None:
            self.trained = False

        async def get_training(self, training_id):
            state = "C" if self.trained else "O"
            return {
                "state": state,
                "phase": "update",
                "round": 0,
                "model": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
            }

    class FlakyParticipant(Participant):
        attempts = 0

        async def _train(self, run, round_, model_id):
            self.attempts += 1
            if self.attempts == 1:
                raise APIError("POST", "/api/models/x/", 400, "not accepting updates", code="wrong_state")
            self.api.trained = True
            return RoundRecord(
                kind="train", round=round_, model_id=model_id, sample_size=1, metrics={}, seconds=0.0
            )

    api = ScriptedAPI()
    poller = FlakyParticipant(api, _noop_train, name="poller")  # type: ignore[arg-type]
    run = await poller.poll("0f8fad5b-d9cb-469f-a165-70867728950e", interval=0.01, timeout=5)
    assert poller.attempts == 2
    assert run.outcome == "finished" and run.errors == [] and run.rounds("train") == [0]


async def test_a_queued_round_is_skipped_once_a_newer_one_was_announced():
    """Asynchronous trainings announce every new version: a participant still busy with version 0
    when versions 1 and 2 are announced trains on 2 next, not on the stale 1."""
    from flplatform.client.participant import RoundRecord

    trained: list[int] = []
    gate = asyncio.Event()

    class GatedParticipant(Participant):
        async def _load_info(self, run, fallback_model_id):
            run.info_loaded = True
            run.global_model_id = fallback_model_id

        async def _train(self, run, round_, model_id):
            trained.append(round_)
            if round_ == 0:
                await gate.wait()
            return RoundRecord("train", round_, model_id, 1, {}, 0.0)

    participant = GatedParticipant(object(), _noop_train, name="busy")  # type: ignore[arg-type]
    training, model = "0f8fad5b-d9cb-469f-a165-70867728950e", "7c9e6679-7425-40de-944b-e07fc1f90ae7"
    for round_ in (0, 1, 2):
        body = {"round": round_, "global_model_uuid": model}
        message = {"notification_type": "UPDATE_ROUND_START", "training_uuid": training, "body": body}
        assert (await participant.handle_notification(message))[0] == 202
        await asyncio.sleep(0.01)
    gate.set()
    for _ in range(100):
        if len(participant.run_for(training).records) == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert trained == [0, 2]
    assert participant.run_for(training).rounds("train") == [0, 2]
    await participant.aclose()
