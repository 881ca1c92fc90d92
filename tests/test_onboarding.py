"""A newcomer's route to a first user: the /docs description, the 401 of a login while no user
exists (also in the OAuth2 fields Swagger UI's "Auth Error" shows), and the start-up banner."""

from __future__ import annotations

import logging

from flplatform.onboarding import CREATE_SUPERUSER_COMMAND


async def test_docs_description_names_the_first_user_command(client):
    spec = (await client.get("/openapi.json")).json()
    assert CREATE_SUPERUSER_COMMAND in spec["info"]["description"]
    assert "FLP_ADMIN_USERNAME" in spec["info"]["description"]


async def test_failed_login_on_a_fresh_server_says_how_to_create_the_first_user(client):
    refused = await client.post("/api/auth/token/", data={"username": "admin", "password": "whatever-1"})
    assert refused.status_code == 401
    body = refused.json()
    assert body["code"] == "invalid_credentials"
    assert CREATE_SUPERUSER_COMMAND in body["detail"]
    # RFC 6749 §5.2 fields: what OAuth2 clients such as Swagger UI's Authorize dialog display.
    assert body["error"] == "invalid_grant" and body["error_description"] == body["detail"]


async def test_failed_login_once_users_exist_gives_no_hint(client, alice):
    refused = await client.post("/api/auth/token/", data={"username": "alice", "password": "wrong-password"})
    assert refused.status_code == 401
    assert refused.json()["detail"] == "Invalid username/password."
    assert refused.json()["error"] == "invalid_grant"


async def test_start_up_banner_only_without_an_active_superuser(app, make_user, caplog):
    from flplatform.app import _hint_first_user

    with caplog.at_level(logging.WARNING, logger="flplatform.app"):
        await _hint_first_user(app)
    assert CREATE_SUPERUSER_COMMAND in caplog.text and "No active superuser" in caplog.text
    caplog.clear()
    await make_user("root", superuser=True)
    with caplog.at_level(logging.WARNING, logger="flplatform.app"):
        await _hint_first_user(app)
    assert caplog.text == ""
