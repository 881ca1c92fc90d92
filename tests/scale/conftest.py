"""Fixtures of the scale-out tests: one pair of real worker processes per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.scale.harness import Fleet, fleet, server_env

# A job's lease (renewed every third of it while the job runs): short, so the crash test's dead
# worker's job is reclaimed quickly. A job that stalls past it on a loaded machine runs again,
# which the fencing makes harmless (the tests assert exactly-once outcomes, not attempt counts).
WORK_LEASE_SECONDS = 2
# The round claim's own lease is only the backstop for a job that never finishes at all; the
# tests must not depend on it, so it is longer than any of them waits.
AGGREGATION_LEASE_SECONDS = 120


@pytest.fixture(scope="module")
def workers(migrated_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two uvicorn worker processes on the session's PostgreSQL test database (started once per
    module: importing the app costs seconds of CPU). Tests may kill -9 and restart them."""
    if "postgresql" not in migrated_urls:
        pytest.skip("PostgreSQL not available")
    env = server_env(
        migrated_urls["postgresql"],
        FLP_AGGREGATION_LEASE_SECONDS=str(AGGREGATION_LEASE_SECONDS),
        FLP_WORK_LEASE_SECONDS=str(WORK_LEASE_SECONDS),
        FLP_WORKER_POLL_INTERVAL_SECONDS="0.2",
    )
    with fleet(env, tmp_path_factory.mktemp("workers")) as running:
        running.start(2)
        yield running
