"""Real-HTTP harness: the server under uvicorn in a thread, and DLR-style clients whose
notification endpoints are real local HTTP servers reacting like the reference client
(answer at once, then download / train / upload from a worker thread)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import torch
import uvicorn

from flplatform.app import create_app
from flplatform.db import create_engine, create_sessionmaker
from flplatform.orm import User
from flplatform.serving import uvicorn_ws_options
from flplatform.settings import Settings
from flplatform.users.schemas import UserCreate
from flplatform.users.service import create_user
from tests.conftest import free_port, wait_for_port
from tests.training.conftest import as_safetensors, shifted, state_of


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **uvicorn_ws_options()
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def make_users(db_url: str, specs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Create users straight in the database: [(id, token)]."""

    async def _run() -> list[tuple[str, str]]:
        engine = create_engine(db_url)
        maker = create_sessionmaker(engine)
        out = []
        async with maker() as session:
            root = User(username="<tests>", is_superuser=True)
            for spec in specs:
                data = UserCreate(password="password-123", email=f"{spec['username']}@example.org", **spec)
                user, token = await create_user(session, data, created_by=root)
                out.append((str(user.id), token))
            await session.commit()
        await engine.dispose()
        return out

    return asyncio.run(_run())


@dataclass
class FakeClient:
    """One participant. ``train(state, round) -> state`` is its deterministic 'local training'."""

    name: str
    base_url: str
    token: str = ""
    user_id: str = ""
    sample_size: int = 10
    train: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] = lambda s, r: shifted(s, 1.0)
    upload_format: str = "safetensors"  # or "torchscript"
    swag: Callable[[torch.nn.Module, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    reject: set[str] = field(default_factory=set)  # notification types answered with 500
    key: bytes = b""
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    downloads: list[tuple[int, str]] = field(default_factory=list)  # (round, model id)
    uploads: list[tuple[int, str, dict[str, torch.Tensor]]] = field(
        default_factory=list
    )  # (round, local id, state)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30)

    def on_notification(self, body: bytes, headers: Any) -> int:
        message = json.loads(body)
        signature = headers.get("X-FLP-Signature", "")
        timestamp = headers.get("X-FLP-Timestamp", "")
        expected = "sha256=" + hmac.new(self.key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        with self.lock:
            if not hmac.compare_digest(signature, expected):
                self.bad_signatures += 1
            self.received.append(message)
        kind = message["notification_type"]
        if kind in self.reject:
            return 500
        if kind in ("UPDATE_ROUND_START", "MODEL_TEST_ROUND", "SWAG_ROUND_START"):
            threading.Thread(target=self._work, args=(message,), daemon=True).start()
            return 202
        return 200

    def _work(self, message: dict[str, Any]) -> None:
        try:
            kind, body = message["notification_type"], message["body"]
            with self.http() as http:
                if kind == "UPDATE_ROUND_START":
                    self._update(http, body)
                elif kind == "MODEL_TEST_ROUND":
                    r = http.post(
                        f"/api/models/{body['global_model_uuid']}/metrics/",
                        data={"metric_names": ["accuracy", "loss"], "metric_values": ["0.5", "1.25"]},
                    )
                    assert r.status_code == 201, r.text
                elif kind == "SWAG_ROUND_START":
                    self._swag(http, body)
        except Exception as exc:  # surfaced by the test
            with self.lock:
                self.errors.append(f"{self.name}: {type(exc).__name__}: {exc}")

    def _update(self, http: httpx.Client, body: dict[str, Any]) -> None:
        round_, download = body["round"], body["global_model_uuid"]
        target = body.get("training_model_uuid", download)
        r = http.get(f"/api/models/{download}/")
        assert r.status_code == 200, r.text
        template = r.content
        state = self.train(state_of(template), round_)
        if self.upload_format == "torchscript":
            module = torch.jit.load(io.BytesIO(template))
            with torch.no_grad():
                for k, v in module.state_dict().items():
                    v.copy_(state[k])
            buf = io.BytesIO()
            torch.jit.save(module, buf)
            data = buf.getvalue()
        else:
            data = as_safetensors(state)
        r = http.post(
            f"/api/models/{target}/",
            data={
                "round": str(round_),
                "sample_size": str(self.sample_size),
                "metric_names": ["train_loss"],
                "metric_values": ["0.1"],
            },
            files={"model_file": ("update.pt", data)},
        )
        assert r.status_code == 201, r.text
        with self.lock:
            self.downloads.append((round_, download))
            self.uploads.append((round_, r.json()["model_id"], state))

    def _swag(self, http: httpx.Client, body: dict[str, Any]) -> None:
        assert self.swag is not None
        r = http.get(f"/api/models/{body['global_model_uuid']}/")
        module = torch.jit.load(io.BytesIO(r.content))
        first, second = self.swag(module, body["round"])
        r = http.post(
            f"/api/models/{body['global_model_uuid']}/swag/",
            data={"round": str(body["round"]), "sample_size": str(self.sample_size)},
            files={
                "first_moment_file": ("fm.safetensors", as_safetensors({"moment": first})),
                "second_moment_file": ("sm.safetensors", as_safetensors({"moment": second})),
            },
        )
        assert r.status_code == 201, r.text


@contextmanager
def notification_servers(clients: list[FakeClient]) -> Iterator[dict[str, str]]:
    """One ThreadingHTTPServer; client i listens on /<name>/. Returns name → endpoint URL."""
    by_path = {f"/{c.name}/": c for c in clients}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            client = by_path.get(self.path)
            status = 404 if client is None else client.on_notification(body, self.headers)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {c.name: f"http://127.0.0.1:{port}/{c.name}/" for c in clients}
    finally:
        server.shutdown()
        server.server_close()


def wait_until(
    http: httpx.Client,
    training_id: str,
    cond: Callable[[dict[str, Any]], bool],
    timeout: float = 30.0,
    clients: list[FakeClient] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/api/trainings/{training_id}/").json()
        if cond(body):
            return body
        for c in clients or []:
            if c.errors:
                raise AssertionError(f"client errors: {c.errors}; training: {body}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; training: {body}")
        time.sleep(0.05)


def setup_clients(
    db_url: str, base_url: str, clients: list[FakeClient], endpoints: dict[str, str], actor: str = "actor"
) -> tuple[str, str]:
    """Create the actor and the clients (with endpoints) and fetch the clients' notification keys."""
    specs = [{"username": actor, "actor": True}] + [
        {"username": c.name, "client": True, "message_endpoint": endpoints[c.name]} for c in clients
    ]
    made = make_users(db_url, specs)
    actor_id, actor_token = made[0]
    for c, (uid, token) in zip(clients, made[1:], strict=True):
        c.user_id, c.token = uid, token
        with c.http() as http:
            c.key = http.get("/api/users/myself/notification-key/").json()["key"].encode()
    return actor_id, actor_token
