"""``/metrics`` (issue 16 items 4 and 5): off by default, on with ``FLP_METRICS_ENABLED`` (and the
token when ``FLP_METRICS_TOKEN`` is set), Prometheus' text format, counters that move as a
training runs a round, HTTP series by route template. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flplatform.app import create_app
from flplatform.settings import Settings
from tests.training.conftest import (
    as_safetensors,
    create_training,
    post_update,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
    upload_global,
)
from tests.training.test_lifecycle_api import wait_training

TOKEN = "scrape-secret-1"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url, metrics_enabled=True, metrics_token=TOKEN, training_sweep_interval_seconds=0.05
    )


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics", headers=BEARER)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):  # raises on anything malformed
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_are_off_by_default(db_url: str) -> None:
    default = Settings(database_url=db_url)
    assert default.metrics_enabled is False and default.metrics_token is None
    transport = httpx.ASGITransport(app=create_app(default))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        r = await client.get("/metrics", headers=BEARER)
    assert r.status_code == 404
    assert r.json()["code"] == "not_found"


async def test_token_is_required_when_set(client: httpx.AsyncClient, app: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Token {TOKEN}"}):
        r = await client.get("/metrics", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["code"] == "metrics_token_required"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert (await client.get("/metrics", headers=BEARER)).status_code == 200
    app.state.settings.metrics_token = None  # enabled without a token: open (behind a firewall)
    assert (await client.get("/metrics")).status_code == 200
    assert "/metrics" not in (await client.get("/openapi.json")).json()["paths"]


async def test_exposition_parses_and_lists_every_family(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics", headers=BEARER)
    names = {family.name for family in text_string_to_metric_families(r.text)}
    assert {
        "flplatform_uploads",
        "flplatform_upload_bytes",
        "flplatform_upload_seconds",
        "flplatform_rounds_completed",
        "flplatform_aggregation_seconds",
        "flplatform_workqueue_jobs",
        "flplatform_job_wait_seconds",
        "flplatform_job_run_seconds",
        "flplatform_inference_requests",
        "flplatform_inference_seconds",
        "flplatform_broker_messages_published",
        "flplatform_broker_messages_delivered",
        "flplatform_broker_messages_refused",
        "flplatform_broker_sockets",
        "flplatform_http_requests",
        "flplatform_http_request_seconds",
    } <= names
    openmetrics = await client.get(
        "/metrics", headers={**BEARER, "Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    samples = await scrape(client)
    # The queue depth comes from the database: every registered kind, waiting and processing.
    assert value(samples, "flplatform_workqueue_jobs", kind="training.aggregate", status="waiting") == 0
    assert (
        "flplatform_workqueue_jobs",
        frozenset({("kind", "training.aggregate"), ("status", "processing")}),
    ) in (samples)


async def test_counters_move_as_a_training_runs_a_round(
    client: httpx.AsyncClient, alice: Any, make_user: Any
) -> None:
    c1 = await make_user("c1", client=True)
    c2 = await make_user("c2", client=True)
    initial = scripted_bytes(tiny_net())
    model_id = await upload_global(client, alice.headers, initial)
    training_id = await create_training(client, alice.headers, model_id, [c1.id, c2.id])
    assert (
        await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    ).status_code == 202
    before = await scrape(client)

    state = state_of(initial)
    updates = [as_safetensors(shifted(state, 1.0)), as_safetensors(shifted(state, -0.5))]
    for account, update in zip((c1, c2), updates, strict=True):
        r = await post_update(client, account.headers, model_id, update, 0, 10)
        assert r.status_code == 201, r.text
    await wait_training(client, alice.headers, training_id, lambda b: b["round"] == 1)
    # The work queue books the job as finished just after the handler's commit, which is
    # what makes round 1 visible: scrape until that last step has happened too.
    job_run = ("flplatform_job_run_seconds_count", {"kind": "training.aggregate", "outcome": "finished"})
    scrapes = 0
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        after = await scrape(client)
        scrapes += 1
        finished = value(after, job_run[0], **job_run[1]) - value(before, job_run[0], **job_run[1])
        if finished or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("flplatform_uploads_total", kind="update") == 2
    assert moved("flplatform_upload_bytes_total", kind="update") == sum(len(u) for u in updates)
    assert moved("flplatform_upload_seconds_count", kind="update") == 2
    assert moved("flplatform_rounds_completed_total", method="fedavg") == 1
    assert moved("flplatform_aggregation_seconds_count", method="fedavg") == 1
    assert moved("flplatform_aggregation_seconds_sum", method="fedavg") > 0
    assert moved("flplatform_job_wait_seconds_count", kind="training.aggregate") == 1
    assert moved("flplatform_job_run_seconds_count", kind="training.aggregate", outcome="finished") == 1
    # HTTP: the route template, never the raw path (bounded cardinality).
    upload = {"method": "POST", "route": "/api/models/{model_id}/"}
    assert moved("flplatform_http_requests_total", **upload, status="201") == 2
    assert moved("flplatform_http_request_seconds_count", **upload) == 2
    assert moved("flplatform_http_requests_total", method="GET", route="/metrics", status="200") == scrapes
    routes = {dict(labels).get("route", "") for _, labels in after}
    assert not [route for route in routes if UUID.search(route)], routes


async def test_unknown_paths_and_methods_share_one_series(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    for path in ("/no/such/path", "/api/models/00000000-0000-0000-0000-000000000000/nothing/", "/x" * 20):
        assert (await client.get(path)).status_code == 404
    assert (await client.request("BREW", "/health")).status_code == 405
    after = await scrape(client)
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert (
        value(after, "flplatform_http_requests_total", **unmatched)
        - value(before, "flplatform_http_requests_total", **unmatched)
        == 3
    )
    brewed = {"method": "OTHER", "route": "/health", "status": "405"}
    assert (
        value(after, "flplatform_http_requests_total", **brewed)
        - value(before, "flplatform_http_requests_total", **brewed)
        == 1
    )
