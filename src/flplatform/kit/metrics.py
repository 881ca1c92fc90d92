"""Every Prometheus metric flplatform exports, defined once, and the one-line calls the domains
make to move them (docs/operations.md, "Prometheus metrics", lists them with their labels).

Label values are always from a small closed set (upload kinds, aggregator names, registered job
kinds, uncertainty methods, socket roles, route templates): never ids, user names or raw paths,
so the number of series stays bounded. The broker's per-message path only increments unlabelled
counters (a few hundred nanoseconds; in multiprocess mode a write into a memory-mapped file).

Whether values live in this process's memory or in ``PROMETHEUS_MULTIPROC_DIR`` (several server
processes behind one scrape target) is decided by prometheus-client when it is first imported:
``flplatform.kit.prometheus`` reads them back either way and serves them at ``/metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

# Seconds: from a small upload (10 ms) to a large aggregation (10 min).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_HTTP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# --- uploads (models/, trainings/contributions.py)
UPLOADS = Counter("flplatform_uploads", "Model files accepted, by kind (update, global)", ["kind"])
UPLOAD_BYTES = Counter("flplatform_upload_bytes", "Bytes of accepted model files, by kind", ["kind"])
UPLOAD_SECONDS = Histogram(
    "flplatform_upload_seconds",
    "Time to check and store an accepted model file (decode, validate, write), by kind",
    ["kind"],
    buckets=_SECONDS,
)

# --- rounds and aggregation (trainings/runtime.py)
ROUNDS_COMPLETED = Counter(
    "flplatform_rounds_completed", "Training rounds aggregated and committed, by aggregator", ["method"]
)
AGGREGATION_SECONDS = Histogram(
    "flplatform_aggregation_seconds",
    "Time to aggregate a round's updates into the new global model, by aggregator",
    ["method"],
    buckets=_SECONDS,
)

# --- work queue (workqueue/); its depth is read from the database at scrape time
JOB_WAIT_SECONDS = Histogram(
    "flplatform_job_wait_seconds",
    "Time a job waited in the queue before a worker claimed it",
    ["kind"],
    buckets=_SECONDS,
)
JOB_RUN_SECONDS = Histogram(
    "flplatform_job_run_seconds",
    "Time a worker ran a job, by kind and outcome (finished, error, lost)",
    ["kind", "outcome"],
    buckets=_SECONDS,
)

# --- inference (inference/service.py)
INFERENCE_REQUESTS = Counter(
    "flplatform_inference_requests", "Predictions answered, by uncertainty method", ["method"]
)
INFERENCE_SECONDS = Histogram(
    "flplatform_inference_seconds",
    "Time to answer a prediction (checks, billing, loading, sandbox run), by uncertainty method",
    ["method"],
    buckets=_SECONDS,
)

# --- DASF broker (broker/): unlabelled counters on the per-message path
BROKER_PUBLISHED = Counter("flplatform_broker_messages_published", "Broker messages accepted from producers")
BROKER_DELIVERED = Counter("flplatform_broker_messages_delivered", "Broker messages sent to consumer sockets")
BROKER_REFUSED = Counter(
    "flplatform_broker_messages_refused", "Broker messages refused (invalid, no topic, no permission)"
)
_BROKER_SOCKETS = Gauge(
    "flplatform_broker_sockets",
    "Broker websockets connected now, by role (producer, consumer)",
    ["role"],
    multiprocess_mode="livesum",  # summed over the live processes; a dead worker's sockets drop out
)
BROKER_PRODUCERS = _BROKER_SOCKETS.labels(role="producer")
BROKER_CONSUMERS = _BROKER_SOCKETS.labels(role="consumer")

# --- HTTP (kit/prometheus.py's middleware): the route template, never the raw path
HTTP_REQUESTS = Counter(
    "flplatform_http_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "flplatform_http_request_seconds",
    "Time to answer an HTTP request (until the response headers), by method and route template",
    ["method", "route"],
    buckets=_HTTP_SECONDS,
)


def stopwatch() -> Callable[[], float]:
    """``elapsed = stopwatch()`` … ``elapsed()``: seconds since the call, monotonic."""
    started = time.perf_counter()
    return lambda: time.perf_counter() - started


def observe_upload(kind: str, size: int, seconds: float) -> None:
    UPLOADS.labels(kind).inc()
    UPLOAD_BYTES.labels(kind).inc(size)
    UPLOAD_SECONDS.labels(kind).observe(seconds)


def observe_aggregation(method: str, seconds: float) -> None:
    AGGREGATION_SECONDS.labels(method).observe(seconds)


def round_completed(method: str) -> None:
    ROUNDS_COMPLETED.labels(method).inc()


def observe_job_wait(kind: str, seconds: float) -> None:
    JOB_WAIT_SECONDS.labels(kind).observe(max(seconds, 0.0))


def observe_job_run(kind: str, outcome: str, seconds: float) -> None:
    JOB_RUN_SECONDS.labels(kind, outcome).observe(seconds)


def observe_inference(method: str, seconds: float) -> None:
    INFERENCE_REQUESTS.labels(method).inc()
    INFERENCE_SECONDS.labels(method).observe(seconds)


# (method, route, status) -> the two children: ``labels()`` takes a lock and validates on every
# call; the key space is bounded (methods x route templates x statuses), so this never grows far.
_http_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def observe_http(method: str, route: str, status: int, seconds: float) -> None:
    children = _http_children.get((method, route, status))
    if children is None:
        children = (HTTP_REQUESTS.labels(method, route, str(status)), HTTP_SECONDS.labels(method, route))
        _http_children[(method, route, status)] = children
    children[0].inc()
    children[1].observe(seconds)


def workqueue_depth(counts: dict[tuple[str, str], int]) -> GaugeMetricFamily:
    """The queue depth family (``flplatform_workqueue_jobs``) from ``{(kind, status): count}``,
    built per scrape from the database (the same number whichever process answers)."""
    family = GaugeMetricFamily(
        "flplatform_workqueue_jobs",
        "Jobs in the work queue now, by kind and status",
        labels=["kind", "status"],
    )
    for (kind, status), count in sorted(counts.items()):
        family.add_metric([kind, status], count)
    return family
