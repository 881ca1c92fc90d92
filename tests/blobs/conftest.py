"""The blob store's backends: a directory, and S3 through moto's server mode.

moto (``moto[s3]`` with Flask: ``ThreadedMotoServer``) is an in-process fake of the AWS APIs that speaks
S3's HTTP protocol; the session starts one on a loopback port. It keeps objects in memory,
checks no signatures or permissions, and has no lifecycle rules: it proves that the client code
speaks S3 (keys, ranges, multipart uploads, listing, errors), not how a real server performs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flplatform.blobs import BlobStore, FileBlobStore
from tests.conftest import free_port, wait_for_port

BUCKET = "flp-test-blobs"
ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("obstore")
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


_prefixes = iter(range(10**6))


def make_s3_store(endpoint: str, spool: Path) -> BlobStore:
    from flplatform.blobs.s3 import S3BlobStore

    return S3BlobStore(
        f"s3://{BUCKET}/run-{next(_prefixes)}",
        endpoint=endpoint,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        spool_dir=spool,
    )


@pytest.fixture(params=["filesystem", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "filesystem":
        yield FileBlobStore(tmp_path / "blobs")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        yield make_s3_store(endpoint, tmp_path / "spool")
