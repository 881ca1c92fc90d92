"""Migrations match the ORM; the OpenAPI document is complete; probes answer."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from flplatform.db import create_engine
from flplatform.migrate import AUTOGENERATE_OPTIONS
from flplatform.orm import Base


async def test_migrations_match_models(db_url):
    engine = create_engine(db_url)

    def _diff(conn):
        ctx = MigrationContext.configure(conn, opts=AUTOGENERATE_OPTIONS)
        return compare_metadata(ctx, Base.metadata)

    async with engine.connect() as conn:
        diff = await conn.run_sync(_diff)
    await engine.dispose()
    assert diff == [], f"ORM and migrations differ (write an Alembic revision): {diff}"


async def test_health_and_ready(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


async def test_docs_render_and_every_route_is_documented(client):
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    spec = (await client.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert {"OAuth2PasswordBearer", "HTTPBasic", "TokenAuth"} <= set(schemes)
    assert schemes["OAuth2PasswordBearer"]["flows"]["password"]["tokenUrl"] == "/api/auth/token/"
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("tags"), f"{method} {path} has no tag"
            assert op.get("summary"), f"{method} {path} has no summary"
