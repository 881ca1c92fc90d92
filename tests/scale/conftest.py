"""Fixtures of the scale-out tests: one pair of real worker processes per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.scale.harness import Fleet, fleet, server_env

# Short enough that the crash test's stale claim expires quickly, long enough that a round of
# the small test model aggregates well within it on a loaded 2-core machine.
LEASE_SECONDS = 3


@pytest.fixture(scope="module")
def workers(migrated_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two uvicorn worker processes on the session's PostgreSQL test database (started once per
    module: importing the app costs seconds of CPU). Tests may kill -9 and restart them."""
    if "postgresql" not in migrated_urls:
        pytest.skip("PostgreSQL not available")
    env = server_env(migrated_urls["postgresql"], FLP_AGGREGATION_LEASE_SECONDS=str(LEASE_SECONDS))
    with fleet(env, tmp_path_factory.mktemp("workers")) as running:
        running.start(2)
        yield running
