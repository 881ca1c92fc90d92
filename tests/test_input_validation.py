"""No input answers 500 (issue 14): the text rule (no NUL, no unpaired surrogate) on bodies,
forms, paths, queries and credentials; bounded integers, money and datetimes; the documented
503 of the DASF status view; and a walk over every route of the OpenAPI document sending hostile
values into every parameter and body field. The client does NOT re-raise app exceptions, so an
unhandled error is the 500 a real client would get."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import update

from flplatform.billing.ledger import MAX_BALANCE
from flplatform.kit.schemas import text_problem
from flplatform.orm.billing import LedgerAccount
from flplatform.users.schemas import TokenCreate

NUL, SURROGATE = "a\x00b", "a\ud800b"
HUGE = "99999999999999999999"


@pytest.fixture
async def raw(app):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


def _basic(login: str, password: str) -> dict[str, str]:
    return {
        "Authorization": "Basic "
        + base64.b64encode(f"{login}:{password}".encode("utf-8", "surrogatepass")).decode()
    }


def _is_422(response: httpx.Response) -> bool:
    return response.status_code == 422 and bool(response.json().get("detail"))


class TestText:
    @pytest.mark.parametrize("bad", [NUL, SURROGATE])
    async def test_every_text_field_of_a_body(self, raw, admin, alice, bad):
        cases = [
            ("POST", "/api/users/", {"username": "carol", "password": "long-password", "first_name": bad}),
            ("POST", "/api/users/", {"username": "carol", "password": "long-password", "profile": bad}),
            ("PATCH", f"/api/users/{alice.id}/", {"last_name": bad}),
            ("PUT", f"/api/users/{alice.id}/", {"profile": bad}),
            ("POST", "/api/users/myself/tokens/", {"name": bad}),
            ("POST", "/api/organizations/", {"name": bad}),
            ("POST", "/api/broker/topics/", {"slug": "fine-slug", "description": bad}),
            ("POST", "/api/billing/top-ups/", {"user_id": alice.id, "amount": "1", "description": bad}),
            ("POST", "/api/billing/coupons/", {"code": "WELCOME", "amount": "1", bad: 1}),  # a key
        ]
        for method, url, body in cases:
            response = await raw.request(
                method,
                url,
                content=json.dumps(body),  # ASCII: \ud800 escaped
                headers={**admin.headers, "Content-Type": "application/json"},
            )
            assert _is_422(response), (method, url, body, response.status_code, response.text)

    async def test_anonymous_self_registration(self, raw, app, monkeypatch):
        monkeypatch.setattr(app.state.settings, "allow_self_registration", True)
        for field in ("username", "first_name", "last_name", "password"):
            body = {"username": "mallory", "password": "long-password", field: "x\x00" * 8}
            response = await raw.post("/api/users/", json=body)
            assert _is_422(response), (field, response.text)

    async def test_oauth2_form_and_basic_credentials(self, raw, alice):
        # (A form cannot carry a lone surrogate: its percent-decoding replaces invalid UTF-8.)
        for form in ({"username": NUL, "password": "pw"}, {"username": "alice", "password": NUL}):
            response = await raw.post("/api/auth/token/", data=form)
            assert _is_422(response), (form, response.text)
        for header in (_basic(NUL, "pw"), _basic("alice", NUL)):
            response = await raw.get("/api/users/myself/", headers=header)
            assert _is_422(response), response.text
        not_utf8 = await raw.get("/api/users/myself/", headers=_basic(SURROGATE, "pw"))
        assert not_utf8.status_code == 401  # not UTF-8 once decoded: a malformed header
        assert (
            await raw.get("/api/users/myself/", headers=_basic("alice", alice.password))
        ).status_code == 200

    async def test_path_query_and_websocket_paths(self, raw, admin):
        for url in (
            "/ws/a%00b/status/",
            "/api/broker/topics/a%00b/",
            "/api/billing/statements/2026-1%00/",
            "/api/users/?user_id=%00",
            "/api/billing/operations/?kind=a%00",
        ):
            response = await raw.get(url, headers=admin.headers)
            assert _is_422(response), (url, response.status_code, response.text)
            assert response.json()["code"] == "validation_error"

    async def test_form_fields_of_uploads_keep_their_rule(self, raw, admin):
        response = await raw.post(
            f"/api/models/{uuid.uuid4()}/metrics/",
            headers=admin.headers,
            data={"metric_names": [SURROGATE.replace("\ud800", "\x00")], "metric_values": ["1"]},
        )
        assert 400 <= response.status_code < 500


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_the_text_rule_is_exactly_no_nul_and_no_lone_surrogate(value):
    acceptable = "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    assert (text_problem(value) is None) == acceptable
    try:
        TokenCreate.model_validate(
            {"name": value.strip() or "x", value: 1} if not acceptable else {"name": "x"}
        )
    except ValidationError as exc:
        assert not acceptable and exc.errors()[0]["type"] == "invalid_input"
    else:
        assert acceptable


class TestBounds:
    async def test_non_finite_numbers_in_bodies(self, raw, admin):
        for literal in ("NaN", "Infinity", "-Infinity"):
            # aggregator_options is free-form JSON stored in a JSON column
            body = f'{{"model_id": "{uuid.uuid4()}", "target_num_updates": 1, "aggregator_options": {{"x": {literal}}}}}'
            response = await raw.post(
                "/api/trainings/", content=body, headers={**admin.headers, "Content-Type": "application/json"}
            )
            assert _is_422(response) and "finite" in response.json()["detail"], (literal, response.text)

    async def test_huge_offsets_on_every_list(self, raw, admin):
        for url in (
            "/api/users/",
            "/api/billing/operations/",
            "/api/audit-log/",
            "/api/organizations/",
            "/api/broker/topics/",
            "/api/inference/jobs/",
        ):
            response = await raw.get(url, params={"offset": HUGE}, headers=admin.headers)
            assert _is_422(response), (url, response.text)
            ok = await raw.get(url, params={"offset": "1000000000"}, headers=admin.headers)
            assert ok.status_code == 200, (url, ok.text)

    async def test_extreme_since_and_until(self, raw, admin):
        for url in ("/api/billing/operations/", "/api/audit-log/"):
            for value in ("0001-01-01T00:00:00", "9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59+00:00"):
                response = await raw.get(url, params={"since": value}, headers=admin.headers)
                assert _is_422(response), (url, value, response.text)
            response = await raw.get(url, params={"since": "2026-01-01T00:00:00"}, headers=admin.headers)
            assert response.status_code == 200, response.text  # naive: UTC
        response = await raw.get(
            "/api/billing/operations/", params={"until": "9999-12-31T23:59:59-01:00"}, headers=admin.headers
        )
        assert _is_422(response)

    async def test_statement_months(self, raw, admin):
        for period in ("9999-12", "1969-12", "0000-01", "2026-13"):
            response = await raw.get(f"/api/billing/statements/{period}/", headers=admin.headers)
            assert _is_422(response), (period, response.text)
        assert (await raw.get("/api/billing/statements/2999-12/", headers=admin.headers)).status_code == 200

    async def test_money_fits_the_ledger(self, raw, app, admin, alice):
        for amount in ("92233720368.54775808", "92233720368.54775807", "10000000000", 1e30):
            response = await raw.post(
                "/api/billing/top-ups/", json={"user_id": alice.id, "amount": amount}, headers=admin.headers
            )
            assert _is_422(response), (amount, response.text)
        top = await raw.post(
            "/api/billing/top-ups/",
            json={"user_id": alice.id, "amount": "9999999999.99999999"},
            headers=admin.headers,
        )
        assert top.status_code == 201, top.text
        async with app.state.sessionmaker() as session:  # a balance at the column's end
            await session.execute(
                update(LedgerAccount)
                .where(
                    LedgerAccount.owner_id == alice.user.id,
                    LedgerAccount.balance.is_not(None),
                    LedgerAccount.balance > 0,
                )
                .values(balance=MAX_BALANCE - 5)
            )
            await session.commit()
        over = await raw.post(
            "/api/billing/top-ups/", json={"user_id": alice.id, "amount": "1"}, headers=admin.headers
        )
        assert _is_422(over) and over.json()["code"] == "balance_too_large", over.text
        price = await raw.put(
            "/api/billing/prices/inference_per_sample/",
            json={"amount": "92233720368.54775808"},
            headers=admin.headers,
        )
        assert 400 <= price.status_code < 500, price.text


async def test_dasf_status_503_is_documented_and_answered(raw, app, admin):
    operation = app.openapi()["paths"]["/ws/{slug}/status/"]["get"]
    for code in ("200", "400", "503"):
        assert "text/plain" in operation["responses"][code]["content"], code
    assert "DASF" in operation["responses"]["503"]["description"]
    created = await raw.post(
        "/api/broker/topics/", json={"slug": "status-probe", "supports_dasf": True}, headers=admin.headers
    )
    assert created.status_code == 201, created.text
    response = await raw.get("/ws/status-probe/status/", headers=admin.headers)
    assert response.status_code == 503 and response.text == "Status unknown"


# --------------------------------------------------------------------------- the walk


def _bad_values(schema: dict[str, Any]) -> list[Any]:
    return [NUL, SURROGATE, int(HUGE), -int(HUGE), "9999-12-31T23:59:59-01:00", 1e308]


def _path_value(name: str) -> str:
    return {"slug": "some-topic", "period": "2026-11", "name": "inference_per_sample"}.get(
        name, str(uuid.uuid4())
    )


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


async def test_no_route_answers_500_to_hostile_values(raw, app, admin):
    """Every operation of the OpenAPI document; each path, query and header parameter and each
    top-level JSON body field in turn gets NUL, an unpaired surrogate, a 20-digit integer, a
    far-future datetime and a huge float. Called as a superuser, so permission checks pass and
    the values reach the services and the database."""
    spec = app.openapi()
    failures: list[str] = []
    sent = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            documented = {int(c) for c in operation.get("responses", {}) if c.isdigit()}
            params = operation.get("parameters", [])
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            properties = _resolve(spec, body["schema"]).get("properties", {}) if body else {}

            async def call(
                path_values: dict[str, str],
                query: dict[str, str],
                headers: dict[str, str],
                body_value: Any,
                case: str,
                *,
                _path=path,
                _method=method,
                _documented=documented,
            ) -> None:
                nonlocal sent
                url = _path
                for name, value in path_values.items():
                    url = url.replace("{" + name + "}", value)
                try:
                    response = await raw.request(
                        _method.upper(),
                        url,
                        params=query,
                        headers={**admin.headers, **headers, "Content-Type": "application/json"},
                        content=None if body_value is None else json.dumps(body_value),
                    )
                except (httpx.InvalidURL, UnicodeEncodeError):
                    return  # the client cannot even send it
                sent += 1
                if response.status_code >= 500 and response.status_code not in _documented:
                    failures.append(
                        f"{_method.upper()} {url} {case}: {response.status_code} {response.text[:150]}"
                    )

            base_path = {p["name"]: _path_value(p["name"]) for p in params if p["in"] == "path"}
            for param in params:
                for value in _bad_values(param.get("schema", {})):
                    text = value if isinstance(value, str) else str(value)
                    if param["in"] == "path":
                        await call(
                            {**base_path, param["name"]: text.replace("\x00", "%00")},
                            {},
                            {},
                            None,
                            f"path {param['name']}={value!r}",
                        )
                    elif param["in"] == "query":
                        await call(
                            base_path, {param["name"]: text}, {}, None, f"query {param['name']}={value!r}"
                        )
                    elif param["in"] == "header" and param["name"].lower() != "authorization":
                        await call(
                            base_path, {}, {param["name"]: text}, None, f"header {param['name']}={value!r}"
                        )
            for field in properties:
                for value in _bad_values(properties[field]):
                    await call(base_path, {}, {}, {field: value}, f"body {field}={value!r}")
    assert sent > 1000  # the walk really covers the application
    assert not failures, "\n".join(failures)
