"""Bodies before authentication (issue 14, item 3): the server decides from the headers whether a
body may come in and how large it may be, before it reads a byte of it.

What the server consumed is measured by the request body's own generator (the ASGI transport
pulls a chunk each time the application calls ``receive``), not by RSS.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from flplatform.app import create_app
from flplatform.settings import Settings

MiB = 1024**2
CHUNK = 64 * 1024


class CountingBody:
    """An async request body of ``total`` bytes that counts how many the server pulled."""

    def __init__(self, total: int, *, fill: bytes = b" ", prefix: bytes = b"", pause: float = 0.0):
        self.total = total
        self.fill = fill
        self.prefix = prefix
        self.pause = pause
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        if self.prefix:
            self.pulled += len(self.prefix)
            sent += len(self.prefix)
            yield self.prefix
        block = self.fill * (CHUNK // len(self.fill))
        while sent < self.total:
            piece = block[: min(CHUNK, self.total - sent)]
            sent += len(piece)
            self.pulled += len(piece)
            if self.pause:
                await asyncio.sleep(self.pause)
            yield piece


def assert_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body["detail"], str) and isinstance(body["code"], str)
    return body


@pytest.fixture
async def open_app(db_url: str) -> AsyncIterator[Any]:
    """An application with self-registration on (its own settings, its own lifespan)."""
    application = create_app(Settings(database_url=db_url, allow_self_registration=True))
    async with application.router.lifespan_context(application):
        yield application


def http_for(application: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://testserver")


JSON = {"Content-Type": "application/json"}


async def test_anonymous_200_mib_json_is_refused_before_its_body(client, app):
    assert not app.state.settings.allow_self_registration
    body = CountingBody(200 * MiB, prefix=b'{"username": "x", "password": "', fill=b"a")
    started = time.monotonic()
    resp = await client.post("/api/users/", content=body, headers=JSON)  # chunked: no Content-Length
    assert assert_error(resp, 401)["code"] == "not_authenticated"
    assert "Self-registration" in resp.json()["detail"]
    assert body.pulled <= CHUNK, body.pulled
    assert time.monotonic() - started < 5

    body = CountingBody(200 * MiB, fill=b"a")
    resp = await client.post("/api/users/", content=body, headers={**JSON, "Content-Length": str(200 * MiB)})
    assert assert_error(resp, 413)["code"] == "payload_too_large"
    assert body.pulled <= CHUNK, body.pulled


async def test_self_registration_json_is_capped_while_streaming(open_app):
    async with http_for(open_app) as http:
        body = CountingBody(200 * MiB, prefix=b'{"username": "x", "password": "', fill=b"a")
        resp = await http.post("/api/users/", content=body, headers=JSON)
        detail = assert_error(resp, 413)["detail"]
        limit = open_app.state.settings.max_json_body_bytes
        assert str(limit) in detail
        assert body.pulled <= limit + 2 * CHUNK, body.pulled

        # A body within the limit still registers.
        resp = await http.post(
            "/api/users/",
            json={"username": "newcomer", "password": "long-password-1", "email": "newcomer@example.org"},
        )
        assert resp.status_code == 201, resp.text


async def test_authenticated_json_over_the_limit_is_413_both_ways(client, app, admin):
    limit = app.state.settings.max_json_body_bytes
    assert limit == MiB  # the default
    big = b'{"username": "' + b"a" * (limit + 10) + b'"}'
    resp = await client.post("/api/users/", content=big, headers={**admin.headers, **JSON})
    assert assert_error(resp, 413)["code"] == "payload_too_large"

    body = CountingBody(50 * MiB, prefix=b'{"username": "', fill=b"a")
    resp = await client.post("/api/users/", content=body, headers={**admin.headers, **JSON})
    assert assert_error(resp, 413)["code"] == "payload_too_large"
    assert body.pulled <= limit + 2 * CHUNK, body.pulled


async def test_anonymous_1_gib_multipart_update_is_401_after_reading_nothing(client):
    boundary = "flpboundary"
    prefix = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model_file"; filename="m.pt"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = CountingBody(1024 * MiB, prefix=prefix, fill=b"\0")
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(1024 * MiB)}
    resp = await client.post(f"/api/models/{uuid.uuid4()}/", content=body, headers=headers)
    assert assert_error(resp, 401)["code"] == "not_authenticated"
    assert body.pulled == 0, body.pulled

    # Chunked, with a wrong token, and to the global upload route: the same.
    for path, auth in ((f"/api/models/{uuid.uuid4()}/", "Token " + "0" * 40), ("/api/models/", None)):
        body = CountingBody(1024 * MiB, prefix=prefix, fill=b"\0")
        extra = {"Authorization": auth} if auth else {}
        resp = await client.post(
            path, content=body, headers={"Content-Type": headers["Content-Type"], **extra}
        )
        assert resp.status_code == 401, resp.text
        assert body.pulled == 0, body.pulled


async def test_multipart_is_capped_by_the_upload_limit_while_streaming(db_url, make_user):
    application = create_app(Settings(database_url=db_url, max_upload_bytes=4 * MiB))
    async with application.router.lifespan_context(application):
        owner = await make_user("uploader")  # make_user writes through the shared test app's database
        async with http_for(application) as http:
            boundary = "b"
            prefix = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="model_file"; filename="m.pt"\r\n\r\n'
            ).encode()
            body = CountingBody(64 * MiB, prefix=prefix, fill=b"\0")
            resp = await http.post(
                "/api/models/",
                content=body,
                headers={**owner.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            assert assert_error(resp, 413)["code"] == "payload_too_large"
            assert body.pulled <= 4 * MiB + 2 * CHUNK, body.pulled


async def test_password_is_checked_once_for_a_body_route(client, admin, monkeypatch):
    """The guard authenticates from the headers before the body; the route's dependency reuses it."""
    import flplatform.auth.authentication as auth_module

    calls = 0
    verify = auth_module.verify_password

    async def counting(password: str, password_hash: str | None) -> bool:
        nonlocal calls
        calls += 1
        return await verify(password, password_hash)

    monkeypatch.setattr(auth_module, "verify_password", counting)
    basic = "Basic " + base64.b64encode(f"admin:{admin.password}".encode()).decode()
    resp = await client.post(
        "/api/users/",
        json={"username": "carol", "password": "long-password", "email": "carol@example.org"},
        headers={"Authorization": basic},
    )
    assert resp.status_code == 201, resp.text
    assert calls == 1

    wrong = "Basic " + base64.b64encode(b"admin:wrong-password").decode()
    body = CountingBody(10 * MiB, prefix=b'{"username": "', fill=b"a")
    resp = await client.post("/api/users/", content=body, headers={"Authorization": wrong, **JSON})
    assert assert_error(resp, 401)["code"] == "invalid_credentials"
    assert body.pulled <= CHUNK


async def test_health_answers_while_an_oversized_body_streams(open_app):
    async with http_for(open_app) as http:
        body = CountingBody(200 * MiB, prefix=b'{"username": "', fill=b"a", pause=0.001)
        upload = asyncio.create_task(http.post("/api/users/", content=body, headers=JSON))
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            assert (await http.get("/health")).status_code == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.01)
        resp = await upload
        assert resp.status_code == 413
        assert max(latencies) < 1.0, latencies
        assert body.pulled < 2 * MiB


async def test_inference_json_has_its_own_larger_limit(client, app, alice):
    """1 MiB is the default; POST /api/inference/ takes JSON inputs up to
    FLP_INFERENCE_MAX_JSON_BODY_BYTES (16 MiB) and refuses more with 413."""
    values = ",".join(["0.5"] * (600 * 1024))  # about 2.4 MB of JSON numbers
    content = f'{{"model_id": "{uuid.uuid4()}", "model_input": [[{values}]]}}'.encode()
    assert len(content) > app.state.settings.max_json_body_bytes
    resp = await client.post("/api/inference/", content=content, headers={**alice.headers, **JSON})
    assert resp.status_code == 404, resp.text  # past the body limits: the model does not exist

    limit = app.state.settings.inference_max_json_body_bytes
    body = CountingBody(limit + MiB, prefix=b'{"model_input": "', fill=b"A")
    resp = await client.post("/api/inference/", content=body, headers={**alice.headers, **JSON})
    assert assert_error(resp, 413)["code"] == "payload_too_large"
    assert body.pulled <= limit + 2 * CHUNK


async def test_anonymous_routes_still_take_small_bodies(client, alice):
    resp = await client.post("/api/auth/token/", data={"username": "alice", "password": alice.password})
    assert resp.status_code == 200, resp.text
    resp = await client.post(
        "/api/auth/token/",
        content=CountingBody(5 * MiB, fill=b"a"),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert assert_error(resp, 413)["code"] == "payload_too_large"
