"""Routers refuse a path outside their prefix without trying their routes (kit/routing.py): every
route of the API is still reached, with and without a ``root_path``, and paths beside a prefix
are not taken for it."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from starlette.routing import Match

from flplatform.kit.routing import APIRouter, route_path

ROUTE_MISSING = {"detail": "Not Found", "code": "not_found"}


def concrete(template: str) -> str:
    """A path for a route template: every ``{parameter}`` an id-shaped value."""
    return re.sub(r"\{[^}]+\}", "00000000-0000-0000-0000-000000000001", template)


async def test_every_route_of_the_api_is_reached(app, client):
    paths = app.openapi()["paths"]
    assert len(paths) > 50
    missed = []
    for template, operations in paths.items():
        for method in operations:
            r = await client.request(method.upper(), concrete(template))
            if r.status_code == 405 or (r.status_code == 404 and r.json() == ROUTE_MISSING):
                missed.append(f"{method.upper()} {template}: {r.status_code}")
    assert not missed, missed


def scope(path: str, root_path: str = "") -> dict[str, object]:
    return {"type": "http", "path": path, "root_path": root_path, "method": "GET", "headers": []}


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/api/things/", "", "/api/things/"),
        ("/behind/api/things/", "/behind", "/api/things/"),
        ("/behind", "/behind", ""),
        ("/behindness/api/", "/behind", "/behindness/api/"),  # not under the root path
    ],
)
def test_route_path_strips_the_root_path_as_starlette_does(path, root_path, expected):
    assert route_path(scope(path, root_path)) == expected


def test_a_router_refuses_paths_outside_its_literal_prefix():
    app = FastAPI()
    things = APIRouter(prefix="/api/orgs/{org_id}/things")

    @things.get("/{thing_id}/")
    async def read_thing(org_id: str, thing_id: str) -> dict[str, str]:
        return {"org": org_id, "thing": thing_id}

    app.include_router(things)
    (included,) = [route for route in app.router.routes if getattr(route, "original_router", None) is things]
    assert included.matches(scope("/api/orgs/7/things/8/"))[0] == Match.FULL
    assert included.matches(scope("/behind/api/orgs/7/things/8/", "/behind"))[0] == Match.FULL
    assert included.matches(scope("/api/users/7/things/8/"))[0] == Match.NONE
    assert included.matches(scope("/api/orgs/7/other/8/"))[0] == Match.NONE  # past the literal part
