"""Bad input gets a clear 4xx in the one error shape, never a 500."""

from __future__ import annotations

import pytest


def assert_shape(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["code"], str)
    return body


@pytest.mark.parametrize(
    "body,where",
    [
        ({"username": "x", "password": "long-password", "unknown": 1}, "unknown"),
        ({"username": "x", "password": 12345678}, "password"),
        ({"username": "x" * 151, "password": "long-password"}, "username"),
        ({"username": "bad name!", "password": "long-password"}, "username"),
        ({"username": "x", "password": "short"}, "password"),
        ({"username": "x", "password": "long-password", "email": "not-an-email"}, "email"),
        ({"username": "x", "password": "long-password", "message_endpoint": "ftp:/x"}, "message_endpoint"),
        ({"username": "x", "password": "long-password", "time_format": "11H"}, "time_format"),
        ([1, 2, 3], None),
        ({}, "username"),
    ],
)
async def test_validation_errors_are_422_with_locations(client, admin, body, where):
    resp = await client.post("/api/users/", json=body, headers=admin.headers)
    data = assert_shape(resp, 422)
    assert data["code"] == "validation_error"
    if where:
        assert any(where in [str(p) for p in item["loc"]] for item in data["errors"]), data


async def test_malformed_json_is_400(client, admin):
    resp = await client.post(
        "/api/users/",
        content=b'{"username": "x",',
        headers={**admin.headers, "Content-Type": "application/json"},
    )
    assert assert_shape(resp, 400)["code"] == "malformed_json"


async def test_bad_uuid_in_path_is_422(client, admin):
    resp = await client.get("/api/users/not-a-uuid/", headers=admin.headers)
    assert assert_shape(resp, 422)["code"] == "validation_error"


async def test_unknown_route_is_404_in_shape(client):
    assert assert_shape(await client.get("/api/nothing-here/"), 404)["code"] == "not_found"


async def test_wrong_method_is_405_in_shape(client):
    assert assert_shape(await client.put("/health"), 405)["code"] == "method_not_allowed"


async def test_body_too_large_is_413(client, app, admin):
    from flplatform.app import create_app

    # Its own settings: the shared test application's must stay as they are.
    small = create_app(app.state.settings.model_copy(update={"max_upload_bytes": 10_000}))
    import httpx

    async with small.router.lifespan_context(small):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small), base_url="http://t") as http:
            resp = await http.post("/api/users/", content=b"x" * 20_000, headers=admin.headers)
            assert assert_shape(resp, 413)["code"] == "payload_too_large"

            async def chunks():
                for _ in range(20):
                    yield b"y" * 1000

            resp = await http.post("/api/users/", content=chunks(), headers=admin.headers)
            assert assert_shape(resp, 413)["code"] == "payload_too_large"


async def test_form_instead_of_json_is_4xx(client, admin):
    resp = await client.post("/api/users/", data={"username": "x"}, headers=admin.headers)
    assert 400 <= resp.status_code < 500
