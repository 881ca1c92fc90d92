"""Identity: user creation, the four ways to authenticate, tokens, and refusals."""

from __future__ import annotations

import base64

import pytest


def basic(login: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}


class TestCreateUser:
    async def test_superuser_creates_user_and_sees_token(self, client, admin):
        body = {
            "username": "carol",
            "password": "long-password",
            "email": "Carol@Example.org",
            "client": True,
            "message_endpoint": "http://127.0.0.1:9999/notify",
        }
        resp = await client.post("/api/users/", json=body, headers=admin.headers)
        assert resp.status_code == 201, resp.text
        data = resp.json()
        assert data["username"] == "carol" and data["email"] == "carol@example.org"
        assert len(data["token"]) == 40 and "password" not in data and "password_hash" not in data
        me = await client.get("/api/users/myself/", headers={"Authorization": f"Token {data['token']}"})
        assert me.status_code == 200 and me.json()["id"] == data["id"]

    async def test_anonymous_refused_when_self_registration_off(self, client):
        resp = await client.post("/api/users/", json={"username": "x", "password": "long-password"})
        assert resp.status_code == 401
        assert resp.json()["code"] == "not_authenticated"

    async def test_self_registration_cannot_make_superuser(self, client, app, monkeypatch):
        monkeypatch.setattr(app.state.settings, "allow_self_registration", True)  # shared app: put back after
        body = {"username": "mallory", "password": "long-password", "is_superuser": True}
        resp = await client.post("/api/users/", json=body)
        assert resp.status_code == 403
        ok = await client.post("/api/users/", json={"username": "mallory", "password": "long-password"})
        assert ok.status_code == 201 and ok.json()["is_superuser"] is False

    async def test_non_superuser_cannot_create_users(self, client, alice):
        resp = await client.post(
            "/api/users/", json={"username": "x", "password": "long-password"}, headers=alice.headers
        )
        assert resp.status_code == 403

    async def test_duplicate_username_and_email_conflict(self, client, admin, alice):
        dup = await client.post(
            "/api/users/", json={"username": "alice", "password": "long-password"}, headers=admin.headers
        )
        assert dup.status_code == 409 and dup.json()["code"] == "username_taken"
        dup = await client.post(
            "/api/users/",
            json={"username": "alice2", "password": "long-password", "email": "alice@example.org"},
            headers=admin.headers,
        )
        assert dup.status_code == 409 and dup.json()["code"] == "email_taken"


class TestAuthenticate:
    async def test_token_and_bearer_headers(self, client, alice):
        for scheme in ("Token", "Bearer", "token"):
            resp = await client.get(
                "/api/users/myself/", headers={"Authorization": f"{scheme} {alice.token}"}
            )
            assert resp.status_code == 200 and resp.json()["username"] == "alice"

    async def test_basic_with_username_or_email(self, client, alice):
        for login in ("alice", "alice@example.org"):
            resp = await client.get("/api/users/myself/", headers=basic(login, alice.password))
            assert resp.status_code == 200, resp.text

    async def test_basic_with_token_as_username(self, client, alice):
        resp = await client.get("/api/users/myself/", headers=basic(alice.token, ""))
        assert resp.status_code == 200 and resp.json()["username"] == "alice"

    async def test_oauth2_password_flow(self, client, alice):
        resp = await client.post("/api/auth/token/", data={"username": "alice", "password": alice.password})
        assert resp.status_code == 200, resp.text
        token = resp.json()
        assert token["token_type"] == "bearer" and token["expires_in"] > 0
        me = await client.get(
            "/api/users/myself/", headers={"Authorization": f"Bearer {token['access_token']}"}
        )
        assert me.status_code == 200

    @pytest.mark.parametrize(
        "header",
        [
            "Token nope",
            "Bearer ",
            "Basic !!!",
            "Basic " + base64.b64encode(b"alice:wrong").decode(),
            "Digest abc",
        ],
    )
    async def test_bad_credentials_are_401(self, client, alice, header):
        resp = await client.get("/api/users/myself/", headers={"Authorization": header})
        assert resp.status_code == 401
        assert set(resp.json()) >= {"detail", "code"}

    async def test_wrong_password_login_is_401(self, client, alice):
        resp = await client.post("/api/auth/token/", data={"username": "alice", "password": "bad"})
        assert resp.status_code == 401

    async def test_no_credentials_is_401(self, client):
        resp = await client.get("/api/users/myself/")
        assert resp.status_code == 401
        assert resp.json() == {
            "detail": "Authentication credentials were not provided.",
            "code": "not_authenticated",
        }
        assert "WWW-Authenticate" in resp.headers

    async def test_inactive_user_cannot_log_in(self, client, admin, alice):
        resp = await client.patch(f"/api/users/{alice.id}/", json={"is_active": False}, headers=admin.headers)
        assert resp.status_code == 200
        assert (await client.get("/api/users/myself/", headers=alice.headers)).status_code == 401
        login = await client.post("/api/auth/token/", data={"username": "alice", "password": alice.password})
        assert login.status_code == 401 and login.json()["code"] == "user_inactive"


class TestUserResource:
    async def test_token_shown_only_to_self(self, client, alice, bob):
        own = await client.get(f"/api/users/{alice.id}/", headers=alice.headers)
        assert own.json()["token"] == alice.token
        other = await client.get(f"/api/users/{alice.id}/", headers=bob.headers)
        assert other.status_code == 200 and other.json()["token"] is None
        listing = await client.get("/api/users/", headers=bob.headers)
        assert listing.status_code == 200 and all(u["token"] is None for u in listing.json())
        assert listing.headers["X-Total-Count"] == "2"

    async def test_update_self_but_not_others_or_privileges(self, client, alice, bob):
        ok = await client.patch(
            f"/api/users/{alice.id}/", json={"first_name": "Ada", "date_format": "MDY"}, headers=alice.headers
        )
        assert (
            ok.status_code == 200 and ok.json()["first_name"] == "Ada" and ok.json()["date_format"] == "MDY"
        )
        assert (
            await client.patch(f"/api/users/{bob.id}/", json={"first_name": "X"}, headers=alice.headers)
        ).status_code == 403
        assert (
            await client.patch(f"/api/users/{alice.id}/", json={"is_superuser": True}, headers=alice.headers)
        ).status_code == 403

    async def test_password_change_takes_effect(self, client, alice):
        resp = await client.put(
            f"/api/users/{alice.id}/", json={"password": "brand-new-password"}, headers=alice.headers
        )
        assert resp.status_code == 200
        assert (
            await client.get("/api/users/myself/", headers=basic("alice", "brand-new-password"))
        ).status_code == 200
        assert (
            await client.get("/api/users/myself/", headers=basic("alice", alice.password))
        ).status_code == 401

    async def test_missing_user_is_404(self, client, alice):
        resp = await client.get("/api/users/00000000-0000-4000-8000-000000000000/", headers=alice.headers)
        assert resp.status_code == 404 and resp.json()["code"] == "not_found"

    async def test_delete(self, client, admin, alice, bob):
        assert (await client.delete(f"/api/users/{bob.id}/", headers=alice.headers)).status_code == 403
        assert (await client.delete(f"/api/users/{admin.id}/", headers=admin.headers)).status_code == 403
        assert (await client.delete(f"/api/users/{bob.id}/", headers=admin.headers)).status_code == 200
        assert (await client.get(f"/api/users/{bob.id}/", headers=admin.headers)).status_code == 404


class TestTokens:
    async def test_create_list_revoke(self, client, alice):
        made = await client.post(
            "/api/users/myself/tokens/", json={"name": "ci", "expires_in_days": 1}, headers=alice.headers
        )
        assert made.status_code == 201
        token = made.json()["token"]
        assert token.startswith("flp_")
        assert (
            await client.get("/api/users/myself/", headers={"Authorization": f"Bearer {token}"})
        ).status_code == 200
        listing = (await client.get("/api/users/myself/tokens/", headers=alice.headers)).json()
        assert {t["name"] for t in listing} == {"ci", "primary"} and all("token" not in t for t in listing)
        revoked = await client.delete(f"/api/users/myself/tokens/{made.json()['id']}/", headers=alice.headers)
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        assert (
            await client.get("/api/users/myself/", headers={"Authorization": f"Bearer {token}"})
        ).status_code == 401

    async def test_cannot_revoke_someone_elses_token(self, client, alice, bob):
        made = (await client.post("/api/users/myself/tokens/", json={}, headers=alice.headers)).json()
        resp = await client.delete(f"/api/users/myself/tokens/{made['id']}/", headers=bob.headers)
        assert resp.status_code == 404

    async def test_rotate_primary(self, client, alice):
        rotated = await client.post("/api/users/myself/token/rotate/", headers=alice.headers)
        assert rotated.status_code == 200
        new = rotated.json()["token"]
        assert new != alice.token
        assert (await client.get("/api/users/myself/", headers=alice.headers)).status_code == 401
        me = await client.get("/api/users/myself/", headers={"Authorization": f"Token {new}"})
        assert me.json()["token"] == new

    async def test_tokens_are_not_stored_in_clear(self, session, alice):
        from sqlalchemy import select

        from flplatform.orm import ApiToken

        rows = (await session.execute(select(ApiToken))).scalars().all()
        assert rows and all(alice.token not in (r.digest, r.encrypted) for r in rows)
