"""Blob downloads: ETag = digest, If-None-Match → 304, single ranges → 206, bad ranges → 416."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from flplatform.blobs import FileBlobStore
from flplatform.blobs.http import blob_response, byte_range
from flplatform.errors import RangeNotSatisfiable, install_error_handlers

DATA = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
async def http(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = FileBlobStore(tmp_path)
    digest = (await store.put(DATA)).digest

    async def get(request: Request) -> Response:
        return await blob_response(request, store, digest, headers={"Content-Disposition": 'filename="b"'})

    app = FastAPI()
    app.add_api_route("/b", get)
    install_error_handlers(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield client, digest


async def test_full_download_and_conditional(http) -> None:  # type: ignore[no-untyped-def]
    client, digest = http
    r = await client.get("/b")
    assert r.status_code == 200 and r.content == DATA
    assert r.headers["etag"] == f'"{digest}"' == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert r.headers["content-length"] == str(len(DATA)) and r.headers["accept-ranges"] == "bytes"
    r = await client.get("/b", headers={"If-None-Match": f'"other", "{digest}"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == f'"{digest}"'
    assert (await client.get("/b", headers={"If-None-Match": '"other"'})).status_code == 200


async def test_ranges(http) -> None:  # type: ignore[no-untyped-def]
    client, digest = http
    for header, (start, end) in {
        "bytes=0-99": (0, 100),
        "bytes=10000-": (10000, 10240),
        "bytes=-40": (10200, 10240),
        "bytes=10000-99999": (10000, 10240),
    }.items():
        r = await client.get("/b", headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == DATA[start:end]
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    r = await client.get("/b", headers={"Range": "bytes=20000-"})
    assert r.status_code == 416 and r.headers["content-range"] == "bytes */10240"
    assert r.json()["code"] == "range_not_satisfiable"
    # If-Range with another validator, several ranges, another unit: the whole blob.
    for headers in (
        {"Range": "bytes=0-1", "If-Range": '"stale"'},
        {"Range": "bytes=0-1,5-6"},
        {"Range": "items=0-1"},
    ):
        r = await client.get("/b", headers=headers)
        assert r.status_code == 200 and r.content == DATA
    r = await client.get("/b", headers={"Range": "bytes=0-1", "If-Range": f'"{digest}"'})
    assert r.status_code == 206 and r.content == DATA[:2]


def test_byte_range_rules() -> None:
    assert byte_range("bytes=5-", 10) == (5, 10)
    assert byte_range("bytes=-100", 10) == (0, 10)
    assert byte_range("bytes=-", 10) is None
    with pytest.raises(RangeNotSatisfiable):
        byte_range("bytes=5-4", 10)
    with pytest.raises(RangeNotSatisfiable):
        byte_range("bytes=-0", 10)
