"""The primary token and the server secret (issue 14, item 9).

The never-expiring primary token is shown only to requests authenticated by password or by that
token itself (what the DLR clients do), never to an API token or an OAuth2 bearer, whose
revocation must not leave their holder with a credential that outlives it. The embedded default's
secret file is created 0600 from its first byte and read once per process.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from flplatform.kit import secret_file
from flplatform.settings import Settings


def basic(login: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}


async def _api_token(client, alice) -> str:
    resp = await client.post(
        "/api/users/myself/tokens/", json={"name": "ci", "expires_in_days": 1}, headers=alice.headers
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["token"]


async def _bearer(client, alice) -> str:
    resp = await client.post("/api/auth/token/", data={"username": "alice", "password": alice.password})
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


async def test_password_and_primary_token_see_the_primary_token(client, alice):
    for headers in (
        alice.headers,
        basic("alice", alice.password),
        basic("alice@example.org", alice.password),
        basic(alice.token, ""),
        {"Authorization": f"Bearer {alice.token}"},
    ):
        me = await client.get("/api/users/myself/", headers=headers)
        assert me.status_code == 200 and me.json()["token"] == alice.token, (headers, me.text)
        own = await client.get(f"/api/users/{alice.id}/", headers=headers)
        assert own.status_code == 200 and own.json()["token"] == alice.token


async def test_api_tokens_and_bearers_do_not_see_the_primary_token(client, alice):
    api_token = await _api_token(client, alice)
    bearer = await _bearer(client, alice)
    for headers in (
        {"Authorization": f"Token {api_token}"},
        {"Authorization": f"Bearer {api_token}"},
        basic(api_token, ""),
        {"Authorization": f"Bearer {bearer}"},
    ):
        me = await client.get("/api/users/myself/", headers=headers)
        assert me.status_code == 200, me.text
        assert me.json()["token"] is None and me.json()["id"] == alice.id
        own = await client.get(f"/api/users/{alice.id}/", headers=headers)
        assert own.status_code == 200 and own.json()["token"] is None
        # Nor can they mint a new primary token.
        rotated = await client.post("/api/users/myself/token/rotate/", headers=headers)
        assert rotated.status_code == 403, rotated.text
        assert rotated.json()["code"] == "primary_token_required"
    # The primary token is unchanged and still works.
    assert (await client.get("/api/users/myself/", headers=alice.headers)).json()["token"] == alice.token


def test_secret_file_is_created_0600_and_read_once(tmp_path: Path):
    path = tmp_path / ".flplatform-secret"
    previous = os.umask(0)  # even with a permissive umask
    try:
        value = secret_file.file_secret(path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == value and len(value) >= 40
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left behind
    path.unlink()
    assert secret_file.file_secret(path) == value  # cached: not read (nor recreated) again
    assert not path.exists()


def test_a_second_creator_uses_the_first_ones_secret(tmp_path: Path):
    path = tmp_path / "secret"
    first = secret_file._create_secret(path)
    second = secret_file._create_secret(path)  # loses the race: its link fails, it reads the winner's
    assert second == first == path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_embedded_default_secret_comes_from_the_cached_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db", secret_key=None)
    value = settings.secret()
    secret_file = tmp_path / ".flplatform-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret_file.unlink()
    assert settings.secret() == value


def test_existing_secret_file_is_read_as_is(tmp_path: Path):
    path = tmp_path / "kept"
    path.write_text("kept-secret-value\n")
    path.chmod(0o600)
    assert secret_file.file_secret(path) == "kept-secret-value"
