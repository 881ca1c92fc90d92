"""Blobs over HTTP: streamed downloads with ``ETag`` = the digest, ``If-None-Match`` → 304, and
single byte ranges (``Range: bytes=a-b``, ``bytes=a-``, ``bytes=-n``; ``If-Range``) → 206.

A blob never changes, so its digest is a strong validator: a participant that already holds the
bytes sends ``If-None-Match: "<digest>"`` and downloads nothing. Several ranges in one request
are answered with the whole blob (RFC 9110 lets a server ignore ``Range``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from flplatform.blobs.base import BlobNotFound, BlobStore
from flplatform.blobs.config import store_for
from flplatform.errors import NotFound, RangeNotSatisfiable

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _matches(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a single-range header; None to send everything; raises 416."""
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None:  # another unit, several ranges, or garbage: ignore it
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last n bytes
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable("An empty suffix range selects nothing.", size=size)
        return max(0, size - length), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or (last and int(last) < start):
        raise RangeNotSatisfiable(f"The range starts past the end ({size} bytes).", size=size)
    return start, end


async def blob_response(
    request: Request,
    store: BlobStore,
    digest: str,
    *,
    media_type: str = "application/octet-stream",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The blob as a streamed response (raises ``BlobNotFound`` before any byte is sent)."""
    size = await store.size(digest)
    etag = f'"{digest}"'
    base = {"ETag": etag, "Accept-Ranges": "bytes", **(headers or {})}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers=base)
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and (if_range is None or if_range.strip() == etag):
        selected = byte_range(range_header, size)
        if selected is not None:
            start, end = selected
            return StreamingResponse(
                store.stream(digest, start=start, end=end),
                status_code=206,
                media_type=media_type,
                headers={
                    **base,
                    "Content-Range": f"bytes {start}-{end - 1}/{size}",
                    "Content-Length": str(end - start),
                },
            )
    return StreamingResponse(
        store.stream(digest), media_type=media_type, headers={**base, "Content-Length": str(size)}
    )


async def blob_download(request: Request, session: AsyncSession, digest: str, filename: str) -> Response:
    """A download route's answer: the blob of the session's store as ``filename``; 404 if it is gone."""
    try:
        return await blob_response(
            request, store_for(session), digest, headers={"Content-Disposition": f'filename="{filename}"'}
        )
    except BlobNotFound:
        raise NotFound("The stored bytes are missing from the blob store.") from None
