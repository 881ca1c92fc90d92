"""Crash recovery (issue 14, item 4): a round whose condition was met when the process died is
finished after a restart, exactly once.

A process killed after acknowledging a round's last update but before ``advance`` claimed the
round leaves: state O, every update in, ``locked`` false, no aggregation job. The deterministic
tests produce exactly that state (the upload path's after-commit ``advance`` is cut off, as the
kill would) and then start the server again; the last test kills a real server process with
SIGKILL right after the final update's 201 and restarts it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from flplatform.app import create_app
from flplatform.orm import GlobalModelRound, Notification, Training, User
from flplatform.orm.workqueue import QueuedWork
from flplatform.settings import Settings
from flplatform.trainings.runtime import AGGREGATE_JOB
from flplatform.trainings.sweeper import runtime_of
from flplatform.users.schemas import UserCreate
from flplatform.users.service import create_user
from tests.scale.harness import fleet, server_env
from tests.training.conftest import (
    as_safetensors,
    create_training,
    post_update,
    shifted,
    state_of,
    upload_global,
)
from tests.training.live import make_users
from tests.training.test_lifecycle_api import wait_training

CLIENTS = 3


def _settings(db_url: str, **fields: Any) -> Settings:
    return Settings(database_url=db_url, training_sweep_interval_seconds=0.05, **fields)


@asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """One server lifetime: start-up (recovery runs here), requests, shutdown."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as http,
    ):
        yield app, http


async def _accounts(app: Any) -> tuple[dict[str, str], list[tuple[str, dict[str, str]]]]:
    root = User(username="<tests>", is_superuser=True)
    out = []
    async with app.state.sessionmaker() as session:
        for name, fields in [("actor", {"actor": True})] + [
            (f"c{i}", {"client": True}) for i in range(CLIENTS)
        ]:
            user, token = await create_user(
                session,
                UserCreate(username=name, password="password-123", email=f"{name}@example.org", **fields),
                created_by=root,
            )
            out.append((str(user.id), {"Authorization": f"Token {token}"}))
        await session.commit()
    return out[0][1], out[1:]


async def _crash_state(
    app: Any, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, dict]:
    """Start a training and upload every update with the after-commit ``advance`` cut off:
    the database is left as a kill -9 between the last 201 and the claim leaves it."""
    actor, clients = await _accounts(app)
    model_id = await upload_global(http, actor)
    training_id = await create_training(
        http, actor, model_id, [uid for uid, _ in clients], options={"skip_model_tests": True}
    )
    assert (await http.post(f"/api/trainings/{training_id}/start/", headers=actor)).status_code == 202
    state = state_of((await http.get(f"/api/models/{model_id}/", headers=actor)).content)

    async def killed_before_advancing(_training_id: uuid.UUID) -> None:
        return None

    monkeypatch.setattr(runtime_of(app), "advance", killed_before_advancing)
    for i, (_uid, headers) in enumerate(clients):
        r = await post_update(http, headers, model_id, as_safetensors(shifted(state, float(i))), 0)
        assert r.status_code == 201, r.text
    return training_id, model_id, actor


async def _assert_stuck(http: httpx.AsyncClient, actor: dict[str, str], training_id: str) -> None:
    await asyncio.sleep(0.5)  # ten sweeps
    body = (await http.get(f"/api/trainings/{training_id}/", headers=actor)).json()
    assert (body["state"], body["phase"], body["round"], body["locked"]) == ("O", "update", 0, False), body
    assert body["local_models_arrived"] == body["local_models_expected"] == CLIENTS, body


async def _assert_completed_once(app: Any, model_id: str, training_id: str) -> None:
    async with app.state.sessionmaker() as session:
        rounds = (
            await session.execute(
                select(func.count())
                .select_from(GlobalModelRound)
                .where(GlobalModelRound.model_id == uuid.UUID(model_id))
            )
        ).scalar_one()
        assert rounds == 2  # the initial round and exactly one aggregation
        jobs = (
            await session.execute(select(QueuedWork.payload).where(QueuedWork.handler == AGGREGATE_JOB))
        ).all()
        assert [p["round"] for (p,) in jobs] == [0], jobs
        starts = [
            json.loads(p)["body"]["round"]
            for (p,) in (
                await session.execute(
                    select(Notification.payload).where(
                        Notification.notification_type == "UPDATE_ROUND_START",
                        Notification.training_id == uuid.UUID(training_id),
                    )
                )
            ).all()
        ]
        assert sorted(starts) == [0] * CLIENTS + [1] * CLIENTS, starts
        training = await session.get(Training, uuid.UUID(training_id))
        assert training is not None and not training.locked


async def test_restart_finishes_a_round_whose_last_update_was_acknowledged(db_url, monkeypatch):
    # Recovery only at start-up here (the periodic re-check is far away), to show that the
    # restart is what finishes the round.
    settings = _settings(db_url, training_recovery_interval_seconds=3600)
    async with _running(settings) as (app, http):
        training_id, model_id, actor = await _crash_state(app, http, monkeypatch)
        await _assert_stuck(http, actor, training_id)
    monkeypatch.undo()
    async with _running(settings) as (app, http):
        body = await wait_training(
            http, actor, training_id, lambda b: b["round"] == 1 and b["phase"] == "update"
        )
        assert body["state"] == "O" and body["local_models_arrived"] == 0, body
        await _assert_completed_once(app, model_id, training_id)


async def test_periodic_sweep_finishes_such_a_round_without_a_restart(db_url, monkeypatch):
    # E.g. the process that acknowledged the update died, another one keeps running.
    settings = _settings(db_url, training_recovery_interval_seconds=0.3)
    async with _running(settings) as (app, http):
        training_id, model_id, actor = await _crash_state(app, http, monkeypatch)
        monkeypatch.undo()
        await wait_training(http, actor, training_id, lambda b: b["round"] == 1 and b["phase"] == "update")
        await _assert_completed_once(app, model_id, training_id)


async def test_recovery_skips_an_open_round_without_loading_its_participants(db_url, monkeypatch):
    # A round still waiting for updates is left alone by one lock-free read: the participant
    # list (thousands of rows in a large fleet) is not loaded every recovery interval.
    from flplatform.trainings import sweeper

    settings = _settings(db_url, training_recovery_interval_seconds=3600)
    async with _running(settings) as (app, http):
        actor, clients = await _accounts(app)
        model_id = await upload_global(http, actor)
        training_id = await create_training(
            http, actor, model_id, [uid for uid, _ in clients], options={"skip_model_tests": True}
        )
        assert (await http.post(f"/api/trainings/{training_id}/start/", headers=actor)).status_code == 202
        state = state_of((await http.get(f"/api/models/{model_id}/", headers=actor)).content)
        r = await post_update(http, clients[0][1], model_id, as_safetensors(shifted(state, 1.0)), 0)
        assert r.status_code == 201, r.text
        loaded: list[uuid.UUID] = []
        real_get_training = sweeper.get_training

        async def counting(session: Any, training_id: uuid.UUID, **kw: Any) -> Any:
            loaded.append(training_id)
            return await real_get_training(session, training_id, **kw)

        monkeypatch.setattr(sweeper, "get_training", counting)
        assert await sweeper.recover(runtime_of(app)) == []
        assert loaded == []
        body = (await http.get(f"/api/trainings/{training_id}/", headers=actor)).json()
        assert (body["state"], body["round"], body["local_models_arrived"]) == ("O", 0, 1), body


@pytest.mark.slow
def test_kill9_right_after_the_final_update_then_restart(db_url, tmp_path):
    """A real server process, SIGKILLed the moment the final update's 201 arrives."""
    env = server_env(
        db_url,
        FLP_TRAINING_RECOVERY_INTERVAL_SECONDS="3600",
        FLP_WORK_LEASE_SECONDS="2",
        FLP_WORKER_POLL_INTERVAL_SECONDS="0.2",
    )
    made = make_users(
        db_url,
        [{"username": "actor", "actor": True}]
        + [{"username": f"k{i}", "client": True} for i in range(CLIENTS)],
    )
    actor = {"Authorization": f"Token {made[0][1]}"}
    clients = [(uid, {"Authorization": f"Token {token}"}) for uid, token in made[1:]]

    async def scenario(workers: Any) -> None:
        [url] = workers.start(1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            model_id = await upload_global(http, actor)
            training_id = await create_training(
                http, actor, model_id, [uid for uid, _ in clients], options={"skip_model_tests": True}
            )
            assert (await http.post(f"/api/trainings/{training_id}/start/", headers=actor)).status_code == 202
            state = state_of((await http.get(f"/api/models/{model_id}/", headers=actor)).content)
            for i, (_uid, headers) in enumerate(clients):
                r = await post_update(http, headers, model_id, as_safetensors(shifted(state, float(i))), 0)
                assert r.status_code == 201, r.text
        workers.kill9()  # at once after the last 201
        [url] = workers.start(1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                body = (await http.get(f"/api/trainings/{training_id}/", headers=actor)).json()
                if body["round"] == 1 and body["phase"] == "update":
                    break
                assert body["state"] == "O", body
                assert time.monotonic() < deadline, (
                    f"round never completed after the restart: {body}\n{workers.logs()}"
                )
                await asyncio.sleep(0.1)
            r = await http.get(f"/api/models/{model_id}/", headers=actor, params={"round": 1})
            assert r.status_code == 200
            got = state_of(r.content)
            expected = {
                k: sum(shifted(state, float(i))[k].double() for i in range(CLIENTS)) / CLIENTS for k in state
            }
            for key, value in state.items():
                if value.is_floating_point():
                    assert got[key].double().allclose(expected[key], atol=1e-5), key

    with fleet(env, tmp_path) as workers:
        asyncio.run(scenario(workers))
