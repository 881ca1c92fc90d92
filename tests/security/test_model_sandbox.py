"""Issue 14: uploaded TorchScript never loads or runs in the server process.

The hostile modules (file write in ``__setstate__``, ``torch.from_file`` in ``forward``, a loop in
``__setstate__``, a spinning ``forward``) are uploaded through the API on both databases; the
sandbox's confinement is probed from inside a worker; ``flplatform serve`` stops quickly on
SIGTERM while a module spins."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from flplatform.sandbox.opcheck import RefusedModule, check_ops
from flplatform.sandbox.runner import SandboxPool, SandboxSettings, set_pool
from tests.conftest import free_port, wait_for_port
from tests.inference.conftest import DropoutMLP, torchscript_bytes
from tests.security.hostile import (
    LoopsInSetstate,
    ReadsFileInForward,
    SavesInSetstate,
    SpinsInForward,
    archive,
)

DEADLINE = 4.0


@pytest.fixture(scope="module", autouse=True)
def short_deadline_pool():
    """A pool with short deadlines for this module (restored afterwards)."""
    pool = SandboxPool(
        SandboxSettings(workers=2, check_timeout_seconds=DEADLINE, call_timeout_seconds=DEADLINE)
    )
    previous = set_pool(pool)
    yield pool
    set_pool(previous)
    pool.close()


async def upload(client: httpx.AsyncClient, account, data: bytes, **fields) -> httpx.Response:
    form = {"name": "m", "description": "", "type": "GLOBAL", **fields}
    return await client.post(
        "/api/models/", headers=account.headers, data=form, files={"model_file": ("m.pt", data)}
    )


async def test_write_in_setstate_is_refused_and_writes_nothing(client, alice, tmp_path):
    target = tmp_path / "pwned"
    response = await upload(client, alice, archive(SavesInSetstate(str(target))))
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_model_file"
    assert "__setstate__" in response.json()["detail"]
    assert not target.exists()


async def test_from_file_in_forward_is_refused_at_upload_and_never_runs(client, alice, add_model, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOP-SECRET-VALUE")
    module = ReadsFileInForward(str(secret), 16)
    response = await upload(client, alice, archive(module))
    assert response.status_code == 400, response.text
    assert "aten::from_file" in response.json()["detail"]
    # Stored before the sandbox existed (straight into the database): still never run.
    model_id = await add_model(alice, weights=archive(module))
    inferred = await client.post(
        "/api/inference/",
        headers=alice.headers,
        json={"model_id": str(model_id), "model_input": [[0, 0, 0, 0]]},
    )
    assert inferred.status_code == 409, inferred.text
    assert "aten::from_file" in inferred.json()["detail"]
    assert "84" not in inferred.text.replace(str(model_id), "")  # no byte of the secret ('T' = 84) came back


async def test_loop_in_setstate_is_refused_while_health_answers(client, alice):
    async def health_times() -> list[float]:
        times = []
        for _ in range(10):
            start = time.perf_counter()
            assert (await client.get("/health")).status_code == 200
            times.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)
        return times

    uploaded, times = await asyncio.gather(upload(client, alice, archive(LoopsInSetstate())), health_times())
    assert uploaded.status_code == 400, uploaded.text
    assert "__setstate__" in uploaded.json()["detail"]
    assert max(times) < 1.0


async def test_spinning_forward_is_killed_at_the_deadline_and_others_still_answer(
    client, alice, bob, short_deadline_pool
):
    spinning = await upload(client, alice, archive(SpinsInForward()))
    assert spinning.status_code == 201, spinning.text  # ordinary ops only: accepted
    honest = await upload(client, bob, torchscript_bytes(DropoutMLP()))
    assert honest.status_code == 201, honest.text
    await asyncio.to_thread(short_deadline_pool.fill)  # both workers warm

    async def infer(account, model_id: str) -> tuple[httpx.Response, float]:
        start = time.perf_counter()
        body = {"model_id": model_id, "model_input": [[0.0, 1.0, 2.0, 3.0]]}
        response = await client.post("/api/inference/", headers=account.headers, json=body)
        return response, time.perf_counter() - start

    async def bob_meanwhile() -> list[tuple[httpx.Response, float]]:
        await asyncio.sleep(0.5)
        return [await infer(bob, honest.json()["model_id"]) for _ in range(3)]

    (stuck, stuck_time), others = await asyncio.gather(
        infer(alice, spinning.json()["model_id"]), bob_meanwhile()
    )
    assert stuck.status_code == 504, stuck.text
    assert stuck.json()["code"] == "inference_timeout" and "timed out" in stuck.json()["detail"]
    assert DEADLINE <= stuck_time < DEADLINE + 5
    for response, elapsed in others:
        assert response.status_code == 200, response.text
        assert elapsed < DEADLINE  # not queued behind the spinning module
    # The killed worker is gone and replaced: the next inference works.
    again, _ = await infer(bob, honest.json()["model_id"])
    assert again.status_code == 200


def test_checks_refuse_setstate_and_file_ops_without_loading():
    """The op allowlist on its own (the archive pre-scan is a separate layer)."""
    with pytest.raises(RefusedModule, match="__setstate__"):
        check_ops(torch.jit.script(SavesInSetstate("/nonexistent")))
    with pytest.raises(RefusedModule, match="aten::from_file"):
        check_ops(torch.jit.script(ReadsFileInForward("/nonexistent", 1)))
    # The product's own modules pass: the SDK's digits CNN, MC-dropout models, preprocessing
    # modules and the MEAN module the server scripts.
    from flplatform.client.digits import make_model
    from flplatform.sandbox.mean_module import build_mean_module
    from tests.inference.conftest import ImagePreprocessing

    for module in (make_model(), torch.jit.script(DropoutMLP()), torch.jit.script(ImagePreprocessing()),
                   build_mean_module([torch.jit.script(DropoutMLP()), torch.jit.script(DropoutMLP())])):  # fmt: skip
        assert check_ops(module) > 0


def test_confinement_from_inside_a_worker(short_deadline_pool, tmp_path):
    """Even code that got past every check cannot read server files, write, connect or fork."""
    secret = tmp_path / ".flplatform-secret"
    secret.write_text("server-secret")
    database = tmp_path / "flplatform.db"
    database.write_bytes(b"SQLite format 3\x00")
    for path in (secret, database):
        path.chmod(0o644)  # readable by anyone: only the sandbox stops the read
    os.chmod(tmp_path, 0o755)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    importable = Path(torch.__file__)
    try:
        reply, _ = short_deadline_pool.call_sync(
            {"op": "probe", "read": [str(secret), str(database), str(importable)],
             "write": [str(tmp_path / "written"), "/tmp/flp-sandbox-probe"], "connect": [["127.0.0.1", port]]},
            [], 30,
        )  # fmt: skip
    finally:
        listener.close()
    results = reply["results"]
    assert results[f"read {importable}"] == "allowed"  # the probe itself works
    for key in (f"read {secret}", f"read {database}", f"write {tmp_path / 'written'}",
                "write /tmp/flp-sandbox-probe", f"connect 127.0.0.1:{port}", "fork"):  # fmt: skip
        assert results[key].startswith("denied"), (key, results[key])
    assert not (tmp_path / "written").exists() and not Path("/tmp/flp-sandbox-probe").exists()
    assert not any(name.startswith("FLP_") for name in reply["env"])
    if os.geteuid() == 0:
        assert reply["uid"] != 0


def test_serve_exits_quickly_on_sigterm_while_a_module_spins(tmp_path):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FLP_DATABASE_URL": f"sqlite:///{tmp_path}/s.db",
        "FLP_ADMIN_USERNAME": "root", "FLP_ADMIN_PASSWORD": "root-password", "FLP_ADMIN_EMAIL": "root@example.org",
        "FLP_SECRET_KEY": "x" * 48, "FLP_SANDBOX_CALL_TIMEOUT_SECONDS": "120", "FLP_SANDBOX_CHECK_TIMEOUT_SECONDS": "120",
    }  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flplatform.cli", "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        base = f"http://127.0.0.1:{port}"
        auth = ("root", "root-password")
        form = {"name": "m", "description": "", "type": "GLOBAL"}
        looping = httpx.post(f"{base}/api/models/", auth=auth, data=form, timeout=60,
                             files={"model_file": ("m.pt", archive(LoopsInSetstate()))})  # fmt: skip
        assert looping.status_code == 400, looping.text
        spinning = httpx.post(f"{base}/api/models/", auth=auth, data=form, timeout=60,
                              files={"model_file": ("m.pt", archive(SpinsInForward()))})  # fmt: skip
        assert spinning.status_code == 201, spinning.text
        outcome: dict[str, object] = {}

        def infer() -> None:
            try:
                outcome["response"] = httpx.post(
                    f"{base}/api/inference/",
                    auth=auth,
                    timeout=60,
                    json={"model_id": spinning.json()["model_id"], "model_input": [[0.0, 1.0, 2.0, 3.0]]},
                )
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=infer)
        thread.start()
        time.sleep(2.0)  # the module spins in a worker now
        assert httpx.get(f"{base}/health", timeout=1.0).status_code == 200
        start = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        assert time.perf_counter() - start < 5.0
        thread.join(timeout=10)
        response = outcome.get("response")
        if isinstance(response, httpx.Response):
            assert response.status_code == 503, response.text
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


async def test_an_upload_check_past_its_deadline_is_a_400_naming_the_timeout(client, alice):
    pool = SandboxPool(SandboxSettings(workers=1, check_timeout_seconds=0.001))
    await asyncio.to_thread(pool.fill)  # started within its own start-up deadline
    previous = set_pool(pool)
    try:
        response = await upload(client, alice, torchscript_bytes(DropoutMLP()))
    finally:
        set_pool(previous)
        pool.close()
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_model_file"
    assert "timed out" in response.json()["detail"] and "took longer than 0.001" in response.json()["detail"]


async def test_hostile_torchscript_client_updates_are_refused(client, alice, make_user, tmp_path):
    from tests.training.conftest import post_update
    from tests.training.test_api_errors import _started

    clients, model_id, _, _ = await _started(client, alice, make_user)
    target = tmp_path / "pwned-by-update"
    for module, named in ((SavesInSetstate(str(target)), "__setstate__"),
                          (ReadsFileInForward(str(tmp_path / "x"), 1), "aten::from_file")):  # fmt: skip
        response = await post_update(client, clients[0].headers, model_id, archive(module), 0)
        assert response.status_code == 400, response.text
        assert named in response.json()["detail"] and response.json()["code"] == "invalid_model_file"
    assert not target.exists()


async def test_model_output_cannot_reach_the_answer_stream(client, alice, bob):
    """A model printing protocol-looking bytes (TorchScript print() goes to Python's stdout, which
    the worker points at stderr; the frames use a private descriptor, and descriptor 1 is stderr
    too) leaves its own answer and the next user's intact."""
    from tests.security.hostile import PrintsFakeFrames

    printing = await upload(client, alice, archive(PrintsFakeFrames()))
    honest = await upload(client, bob, torchscript_bytes(DropoutMLP()))
    assert printing.status_code == honest.status_code == 201
    for account, response in ((alice, printing), (bob, honest), (alice, printing), (bob, honest)):
        body = {"model_id": response.json()["model_id"], "model_input": [[0.0, 1.0, 2.0, 3.0]],
                "return_scores": True}  # fmt: skip
        answer = await client.post("/api/inference/", headers=account.headers, json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_id"] == response.json()["model_id"]
