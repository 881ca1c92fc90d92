"""``flplatform participant`` end to end: the real command, as subprocesses, against a real
uvicorn server. Two participants run a synchronous FedAvg training with test rounds (one gets
the TorchScript module, one a state dict); one is killed (SIGKILL) in the middle of a round and
started again with its state file: it does not retrain the round it had uploaded and finishes the
training. Two more run an asynchronous (FedBuff) training. Plus the back-off of the command's
server calls."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from flplatform.client.api import APIError
from flplatform.client.command import Display, ParticipantState, Runner, ServerUnreachable
from flplatform.settings import Settings
from tests.training.conftest import scripted_bytes, state_of, tiny_net
from tests.training.live import live_server, make_users

USER_CODE = textwrap.dedent(
    """
    import os, time
    import torch

    def _log(line):
        with open(os.environ["FL_USER_LOG"], "a") as handle:
            handle.write(line + "\\n")

    def train_state_dict(model, ctx):
        _log(f"start {ctx['round']}")
        if os.environ.get("FL_USER_HANG") == str(ctx["round"]):
            time.sleep(300)
        assert ctx["options"]["epochs"] == 2 and ctx["training_id"]
        return {k: (v + 0.1 if v.is_floating_point() else v) for k, v in model.items()}, 10, {"loss": 0.5}

    def train_module(model, ctx):
        _log(f"start {ctx['round']}")
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1)
        return model, 30

    def test(model, ctx):
        return {"accuracy": 0.75}
    """
)


def _command(base: str, token: str, training: str, tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flplatform.cli",
        "participant",
        "--server",
        base,
        "--token",
        token,
        "--training",
        training,
        "--state-file",
        str(tmp / f"{name}.json"),
        "--name",
        name,
        "--poll-interval",
        "0.5",
        *extra,
    ]


def _start(command: list[str], tmp: Path, name: str, **env: str) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        "FL_USER_LOG": str(tmp / f"{name}.log"),
        "PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    out = open(tmp / f"{name}.out", "ab")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, cwd=tmp, env=environment, stdout=out, stderr=subprocess.STDOUT)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _setup(base: str, db_url: str, options: dict[str, Any], target: int) -> tuple[str, str, list[str], bytes]:
    (actor_id, actor_token), *clients = make_users(
        db_url,
        [
            {"username": "actor", "actor": True, "is_superuser": True, "is_staff": True},
            {"username": "p1", "client": True},
            {"username": "p2", "client": True},
        ],
    )
    actor = httpx.Client(base_url=base, headers={"Authorization": f"Token {actor_token}"}, timeout=30)
    initial = scripted_bytes(tiny_net())
    r = actor.post(
        "/api/models/",
        data={"name": "tiny", "description": "tiny"},
        files={"model_file": ("m.pt", initial)},
    )
    assert r.status_code == 201, r.text
    model_id = r.json()["model_id"]
    r = actor.post(
        "/api/trainings/",
        json={
            "model_id": model_id,
            "target_num_updates": target,
            "aggregation_method": "FedAvg",
            "metric_names": ["accuracy"],
            "options": options,
            "clients": [user_id for user_id, _ in clients],
        },
    )
    assert r.status_code == 201, r.text
    training_id = r.json()["training_id"]
    assert actor.post(f"/api/trainings/{training_id}/start/").status_code == 202
    actor.close()
    return actor_token, training_id, [token for _, token in clients], initial


def _training(base: str, token: str, training_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=base, headers={"Authorization": f"Token {token}"}, timeout=30) as http:
        body: dict[str, Any] = http.get(f"/api/trainings/{training_id}/").json()
        return body


def _global(base: str, token: str, model_id: str) -> dict[str, torch.Tensor]:
    with httpx.Client(base_url=base, headers={"Authorization": f"Token {token}"}, timeout=30) as http:
        return state_of(http.get(f"/api/models/{model_id}/").content)


def _settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, training_sweep_interval_seconds=0.1, notification_max_attempts=1)


def test_participants_train_are_killed_resume_and_finish(db_url, tmp_path):
    (tmp_path / "fl_user.py").write_text(USER_CODE)
    with live_server(_settings(db_url)) as base:
        actor, training_id, (t1, t2), initial = _setup(base, db_url, {"epochs": 2}, target=3)
        p1 = _start(
            _command(
                base,
                t1,
                training_id,
                tmp_path,
                "p1",
                "--train",
                "fl_user:train_module",
                "--test",
                "fl_user:test",
            ),
            tmp_path,
            "p1",
        )
        p2_command = _command(
            base,
            t2,
            training_id,
            tmp_path,
            "p2",
            "--train",
            f"{tmp_path / 'fl_user.py'}:train_state_dict",
            "--test",
            "fl_user:test",
            "--model-format",
            "state_dict",
        )
        p2 = _start(p2_command, tmp_path, "p2", FL_USER_HANG="1")
        try:
            # p2 uploaded round 0 (its state file says so) and hangs in round 1: kill it there.
            _wait(lambda: "start 1" in _lines(tmp_path / "p2.log"), 120, "p2 to start round 1")
            assert ParticipantState.load(tmp_path / "p2.json", training_id).trained == {0}
            p2.send_signal(signal.SIGKILL)
            p2.wait(timeout=30)
            assert _training(base, actor, training_id)["round"] == 1
            p2 = _start(p2_command, tmp_path, "p2")
            assert p2.wait(timeout=180) == 0, (tmp_path / "p2.out").read_text()
            assert p1.wait(timeout=60) == 0, (tmp_path / "p1.out").read_text()
        finally:
            for process in (p1, p2):
                if process.poll() is None:
                    process.kill()
        body = _training(base, actor, training_id)
        assert body["state"] == "C" and body["round"] == 3, body
        # Both commands sent heartbeats: the training shows them online.
        status = {entry["username"]: entry for entry in body["participant_status"]}
        assert {name: status[name]["liveness"] for name in ("p1", "p2")} == {"p1": "online", "p2": "online"}
        # Round 0 was not trained again after the restart; round 1 (killed mid-way) was.
        assert _lines(tmp_path / "p2.log") == ["start 0", "start 1", "start 1", "start 2"]
        assert _lines(tmp_path / "p1.log") == ["start 0", "start 1", "start 2"]
        state = ParticipantState.load(tmp_path / "p2.json", training_id)
        assert state.trained == {0, 1, 2} and state.tested == {1, 2, 3}
        got, start = _global(base, actor, body["model"]), state_of(initial)
        for key in ("fc1.weight", "fc1.bias", "fc2.weight"):
            assert torch.allclose(got[key], start[key] + 0.3, atol=1e-5), key


def test_participants_run_an_asynchronous_training(db_url, tmp_path):
    (tmp_path / "fl_user.py").write_text(USER_CODE)
    options = {"mode": "async", "fedbuff": {"buffer_size": 2}, "epochs": 2}
    with live_server(_settings(db_url)) as base:
        actor, training_id, (t1, t2), _ = _setup(base, db_url, options, target=3)
        processes = [
            _start(
                _command(base, token, training_id, tmp_path, name, "--train", f"fl_user:{fn}", *extra),
                tmp_path,
                name,
            )
            for name, token, fn, extra in (
                ("p1", t1, "train_module", ()),
                ("p2", t2, "train_state_dict", ("--model-format", "state_dict", "--no-events")),
            )
        ]
        try:
            for name, process in zip(("p1", "p2"), processes, strict=True):
                assert process.wait(timeout=180) == 0, (tmp_path / f"{name}.out").read_text()
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
        body = _training(base, actor, training_id)
        assert body["state"] == "C" and body["round"] == 3, body
        assert _lines(tmp_path / "p1.log") == ["start 0", "start 1", "start 2"]


# --------------------------------------------------------------------------- back-off


def _runner(tmp_path: Path, retry_for: float) -> Runner:
    (tmp_path / "fl_user_unit.py").write_text("def train(model, ctx):\n    return model, 1\n")
    args = argparse.Namespace(
        train=f"{tmp_path / 'fl_user_unit.py'}:train",
        test=None,
        retry_for=retry_for,
        training="t",
        poll_interval=0.1,
        heartbeat_interval=0.1,
    )
    return Runner(args, None, ParticipantState(tmp_path / "s.json", "t"), Display(False, "unit"))


async def test_server_calls_back_off_on_network_errors_and_5xx(tmp_path, monkeypatch):
    sleeps: list[float] = []

    async def no_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr("flplatform.client.command.asyncio.sleep", no_sleep)
    runner = _runner(tmp_path, retry_for=60)
    failures = [httpx.ConnectError("refused"), APIError("GET", "/x", 503, "busy"), httpx.ReadTimeout("slow")]

    async def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    assert await runner.call("reading", flaky) == "ok"
    assert sleeps == [0.5, 1.0, 2.0]

    async def refused() -> None:
        raise APIError("GET", "/x", 403, "no")

    with pytest.raises(APIError):
        await runner.call("reading", refused)

    async def down() -> None:
        raise httpx.ConnectError("refused")

    runner = _runner(tmp_path, retry_for=0)
    with pytest.raises(ServerUnreachable):
        await runner.call("reading", down)


async def test_heartbeats_continue_through_errors_and_stop_when_refused(tmp_path, monkeypatch):
    sleeps: list[float] = []

    async def no_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr("flplatform.client.command.asyncio.sleep", no_sleep)
    answers: list[Any] = [None, httpx.ConnectError("refused"), APIError("POST", "/x", 502, "gw"), None]
    answers.append(APIError("POST", "/x", 403, "not a participant"))
    beats: list[str] = []

    class FakeAPI:
        async def heartbeat(self, training_id: str) -> None:
            beats.append(training_id)
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer

    runner = _runner(tmp_path, retry_for=60)
    runner.api = FakeAPI()
    await runner.beat()  # returns once refused
    assert beats == ["t"] * 5 and not answers
    assert sleeps == [0.1] * 4
