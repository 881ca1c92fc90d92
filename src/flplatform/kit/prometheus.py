"""The Prometheus side of :mod:`flplatform.kit.metrics`: the ``/metrics`` exposition, the access
check, the HTTP middleware, and prometheus-client's multiprocess mode.

**Several server processes, one target.** ``flplatform serve --workers N`` puts N processes behind
one port, and a scrape lands on whichever process accepts it, so per-process registries would
answer with one random worker's counts each time. flplatform therefore uses prometheus-client's
multiprocess mode whenever ``PROMETHEUS_MULTIPROC_DIR`` is set: every process writes its values
into memory-mapped files there, and any process's ``/metrics`` sums them (counters and
histograms over every process that ever ran, the socket gauge over the live ones).
``flplatform serve`` with metrics on and more than one worker sets that directory itself (a fresh
temporary one unless given) and empties it before the workers start; each process marks itself
dead on shutdown (:func:`mark_process_dead`), and a scrape also drops the live gauges of processes
that died without shutting down (killed workers, which uvicorn restarts).

A single process keeps its values in memory (no directory): the same code reads them back.
"""

from __future__ import annotations

import contextlib
import glob
import hmac
import os
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flplatform.errors import Unauthorized
from flplatform.kit import metrics

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE = "<unmatched>"  # 404s for paths no route knows: one series, whatever the path
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LIVE_GAUGE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def multiprocess_mode() -> bool:
    """True when this process's values live in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client
    decides when it is first imported, from the environment)."""
    return values.ValueClass is not values.MutexValue


def prepare_multiprocess_dir(path: str | os.PathLike[str]) -> Path:
    """Create and empty the directory, and export it for the processes started after this call
    (call before they import prometheus-client; ``flplatform serve`` does)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a process's live gauges (its open sockets) from the directory; counters stay."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(os.getpid() if pid is None else pid)


def _reap_dead_processes(directory: str) -> None:
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        match = _LIVE_GAUGE.match(os.path.basename(path))
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:  # alive, another user's
            pass


class _Metrics:
    """A collector that yields fixed metric families (those read from the database per scrape)."""

    def __init__(self, families: Iterable[Metric]):
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


class _Collected:
    """Every process's values (multiprocess mode: the directory, without the live gauges of
    processes that died without shutting down) or this process's (its default registry, with
    the process and GC collectors)."""

    def collect(self) -> Iterable[Metric]:
        if not multiprocess_mode():
            return REGISTRY.collect()
        directory = os.environ[MULTIPROC_ENV]
        _reap_dead_processes(directory)
        return multiprocess.MultiProcessCollector(None, path=directory).collect()


def render(extra: Iterable[Metric] = (), accept: str = "") -> tuple[bytes, str]:
    """The exposition of every metric (summed over processes in multiprocess mode) plus ``extra``
    families, and its content type: the format the ``Accept`` header asks for (OpenMetrics or a
    newer text version), else Prometheus' text format 0.0.4, as prometheus-client's own server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    registry.register(_Metrics(extra))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def start_metrics_server(host: str, port: int) -> None:
    """``flplatform worker --metrics-port``: a job-only process has no API, so its metrics get a
    plain HTTP port of their own (prometheus-client's server in a daemon thread; no token, so
    bind it to a private interface)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    start_http_server(port, addr=host, registry=registry)


async def metrics_access(request: Request) -> None:
    """Dependency of ``/metrics``: with ``FLP_METRICS_TOKEN`` set, the scraper must send it as
    ``Authorization: Bearer <token>`` (Prometheus' ``authorization: {credentials: …}``)."""
    token = request.app.state.settings.metrics_token
    if token is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
        raise Unauthorized(
            "/metrics needs the metrics token: Authorization: Bearer <FLP_METRICS_TOKEN>.",
            code="metrics_token_required",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )


def route_template(scope: Scope, root_path: str) -> str:
    """The matched route's path template (``/api/models/{model_id}/``), with the prefix of any
    mount it sits in; ``/mount/{path}`` for what a mounted app without routes answers (static
    files); ``<unmatched>`` when nothing matched."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    prefix = str(scope.get("root_path", ""))[len(root_path) :]  # the mounts' paths, if any
    if isinstance(route, Mount) or (prefix and not isinstance(path, str)):
        return f"{prefix}/{{path}}"
    return f"{prefix}{path}" if isinstance(path, str) else UNMATCHED_ROUTE


class HTTPMetrics:
    """Pure ASGI middleware: counts each HTTP request by method, route template and status and
    times it until its response headers. Websockets pass through (the broker counts its own)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        elapsed = metrics.stopwatch()
        root_path = str(scope.get("root_path", ""))
        status = 500  # an exception before any response is what the client sees as a 500
        seconds: float | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, seconds
            if message["type"] == "http.response.start":
                status, seconds = int(message["status"]), elapsed()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            route = route_template(scope, root_path)
            metrics.observe_http(method, route, status, elapsed() if seconds is None else seconds)


@contextlib.asynccontextmanager
async def metrics_component(app: FastAPI) -> AsyncIterator[None]:
    """Lifespan component: on shutdown, this process's live gauges leave the shared directory."""
    try:
        yield
    finally:
        mark_process_dead()
