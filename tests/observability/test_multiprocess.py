"""Several server processes behind one scrape target: prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``). Any process's ``/metrics`` sums every process's counters; the
broker's socket gauge counts live processes only, also after one was killed without shutting
down; ``flplatform serve`` empties the directory before its workers start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from flplatform import cli
from flplatform.kit.prometheus import MULTIPROC_ENV
from tests.conftest import free_port, wait_for_port
from tests.scale.harness import fleet, server_env


def _value(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


HEALTH = {"method": "GET", "route": "/health", "status": "200"}


@pytest.mark.postgres_only
@pytest.mark.slow
async def test_two_processes_one_sum(db_url: str, tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = server_env(db_url, FLP_METRICS_ENABLED="true", **{MULTIPROC_ENV: str(directory)})
    with fleet(env, tmp_path) as workers:
        first, second = workers.start(2)
        base = _value(first, "flplatform_http_requests_total", **HEALTH)
        assert base == _value(second, "flplatform_http_requests_total", **HEALTH) > 0  # the start-up polls
        for _ in range(3):
            httpx.get(first + "/health")
        for _ in range(5):
            httpx.get(second + "/health")
        for url in (first, second):  # whichever process answers the scrape
            assert _value(url, "flplatform_http_requests_total", **HEALTH) == base + 8
        pids = {int(path.stem.rsplit("_", 1)[1]) for path in directory.glob("counter_*.db")}
        assert {proc.pid for proc in workers.procs} <= pids

        socket_url = first.replace("http://", "ws://") + "/ws/metrics-test"
        async with websockets.connect(socket_url, open_timeout=20):
            assert _value(second, "flplatform_broker_sockets", role="producer") == 1
            os.kill(workers.procs[0].pid, signal.SIGKILL)  # no shutdown: its live gauge stays behind
            workers.procs[0].wait(timeout=10)
            assert _value(second, "flplatform_broker_sockets", role="producer") == 0  # reaped at scrape
        # Counters of the dead process stay in the sum (a counter never goes down).
        assert _value(second, "flplatform_http_requests_total", **HEALTH) == base + 8
        workers.procs[1].terminate()  # a clean shutdown marks the process dead itself
        workers.procs[1].wait(timeout=20)
        assert not list(directory.glob("gauge_live*.db"))


def test_serve_prepares_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker and no directory: metrics stay in memory. Several: a directory, emptied."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    cli._metrics_directory(1)
    assert MULTIPROC_ENV not in os.environ
    given = tmp_path / "given"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"stale")
    monkeypatch.setenv(MULTIPROC_ENV, str(given))
    cli._metrics_directory(1)  # set by the operator: used (and emptied) even for one worker
    assert not list(given.iterdir())
    monkeypatch.delenv(MULTIPROC_ENV)
    cli._metrics_directory(2)
    made = Path(os.environ[MULTIPROC_ENV])
    assert made.is_dir() and made.name.startswith("flplatform-metrics-")
    made.rmdir()


@pytest.mark.slow
def test_job_worker_serves_its_own_metrics(db_url: str, tmp_path: Path) -> None:
    """``flplatform worker --metrics-port``: a job-only process (no API) is its own scrape target."""
    port = free_port()
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flplatform.cli", "worker", "--no-migrate", "--metrics-port", str(port)],
            env=server_env(db_url),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, timeout=60)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"flplatform_job_run_seconds", "flplatform_aggregation_seconds"} <= names, log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
