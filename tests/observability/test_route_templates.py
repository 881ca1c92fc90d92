"""HTTP series are labelled by route template, also for routes inside mounted apps and for
mounted apps without routes of their own (static files); no database."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY
from starlette.staticfiles import StaticFiles

from flplatform.kit.prometheus import HTTPMetrics


def count(method: str, route: str, status: str) -> float:
    labels = {"method": method, "route": route, "status": status}
    return REGISTRY.get_sample_value("flplatform_http_requests_total", labels) or 0.0


async def test_templates_of_routes_mounts_and_static_files(tmp_path: Path) -> None:
    (tmp_path / "app.js").write_text("ok")
    inner = FastAPI()

    @inner.get("/things/{thing_id}")
    async def thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    outer = FastAPI()

    @outer.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    outer.mount("/sub", inner)
    outer.mount("/assets", StaticFiles(directory=tmp_path))
    outer.add_middleware(HTTPMetrics)
    expected = [
        ("/items/{item_id}", "200", ["/items/a", "/items/b"]),
        ("/sub/things/{thing_id}", "200", ["/sub/things/1", "/sub/things/2"]),
        ("/sub/things/{thing_id}", "422", ["/sub/things/x"]),
        ("/assets/{path}", "200", ["/assets/app.js"]),
        ("/assets/{path}", "404", ["/assets/missing.js"]),
        ("<unmatched>", "404", ["/nowhere"]),
    ]
    before = {(route, status): count("GET", route, status) for route, status, _ in expected}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://t") as client:
        for _, _, paths in expected:
            for path in paths:
                await client.get(path)
    for route, status, paths in expected:
        assert count("GET", route, status) - before[(route, status)] == len(paths), (route, status)
