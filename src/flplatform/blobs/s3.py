"""S3-compatible object storage for installs with several hosts (``FLP_BLOB_URL=s3://bucket/prefix``),
through obstore (the Rust ``object_store`` crate: async, streaming, multipart uploads, its own
connection pool, no botocore).

A writer spools the chunks to a local temporary file while hashing them (the key is the digest,
known only at the end), then uploads the file under ``PREFIX/sha256/ab/cd/<digest>`` (multipart
above 5 MiB) and removes it. Nothing is visible under a digest before its upload completed; a
failed or aborted writer leaves nothing in the bucket (an interrupted multipart upload is aborted
by obstore, or by the bucket's lifecycle rule for incomplete uploads if the process died).
Rewriting an existing blob uploads it again, which refreshes its ``LastModified`` (the sweep's
grace period counts from there).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import S3Store

from flplatform.blobs.base import (
    READ_CHUNK,
    BlobError,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobWriter,
    StoredBlob,
    blob_key,
    check_digest,
)

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

MULTIPART_CHUNK = 8 * 1024**2
# obstore raises its NotFoundError, or a plain FileNotFoundError from some calls (HEAD).
_MISSING = (NotFoundError, FileNotFoundError)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at either end)."""
    parts = urlparse(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
    return parts.netloc, parts.path.strip("/")


class S3BlobStore(BlobStore):
    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        config: S3Config = {"region": region}
        client_options: ClientConfig = {}
        if endpoint:
            config["endpoint"] = endpoint
            # Self-hosted S3 (MinIO, Ceph, Garage…) is addressed by path, often over plain HTTP.
            config["virtual_hosted_style_request"] = False
            if endpoint.startswith("http://"):
                client_options["allow_http"] = True
        if access_key_id is not None:
            config["access_key_id"] = access_key_id
        if secret_access_key is not None:
            config["secret_access_key"] = secret_access_key
        self._store = S3Store(
            self.bucket, prefix=self.prefix or None, config=config, client_options=client_options
        )
        self.spool = (
            Path(spool_dir) if spool_dir is not None else Path(tempfile.gettempdir()) / "flp-blob-spool"
        )

    def writer(self, *, max_bytes: int | None = None) -> BlobWriter:
        return BlobWriter(self.spool, self._finish, max_bytes=max_bytes)

    async def _finish(self, temp: Path, info: BlobInfo) -> None:
        try:
            await obstore.put_async(self._store, blob_key(info.digest), temp, chunk_size=MULTIPART_CHUNK)
        except Exception as exc:
            raise BlobError(f"upload of blob {info.digest} to {self.location} failed: {exc}") from None
        finally:
            await asyncio.to_thread(temp.unlink, missing_ok=True)

    def _finish_sync(self, temp: Path, info: BlobInfo) -> None:
        obstore.put(self._store, blob_key(info.digest), temp, chunk_size=MULTIPART_CHUNK)

    async def stream(
        self, digest: str, *, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK
    ) -> AsyncIterator[bytes]:
        key = blob_key(digest)
        options: dict[str, Any] = {}
        if end is not None:
            if end <= start:
                return
            options["range"] = (start, end)
        elif start:
            options["range"] = {"offset": start}
        try:
            result = await obstore.get_async(self._store, key, options=options or None)  # type: ignore[arg-type]
        except _MISSING:
            raise BlobNotFound(digest) from None
        async for chunk in result.stream(min_chunk_size=chunk_size):
            yield bytes(chunk)

    async def read(self, digest: str) -> bytes:
        try:
            result = await obstore.get_async(self._store, blob_key(digest))
            return bytes(await result.bytes_async())
        except _MISSING:
            raise BlobNotFound(digest) from None

    async def _head(self, digest: str) -> Any:
        return await obstore.head_async(self._store, blob_key(digest))

    async def size(self, digest: str) -> int:
        try:
            return int((await self._head(digest))["size"])
        except _MISSING:
            raise BlobNotFound(digest) from None

    async def modified(self, digest: str) -> float:
        try:
            return float((await self._head(digest))["last_modified"].timestamp())
        except _MISSING:
            raise BlobNotFound(digest) from None

    async def exists(self, digest: str) -> bool:
        try:
            await self._head(check_digest(digest))
        except (*_MISSING, BlobNotFound):
            return False
        return True

    async def delete(self, digest: str) -> None:
        try:
            await obstore.delete_async(self._store, blob_key(digest))
        except _MISSING:
            pass

    async def list(self) -> AsyncIterator[StoredBlob]:
        async for batch in obstore.list(self._store, prefix="sha256"):
            for meta in batch:
                name = str(meta["path"]).rsplit("/", 1)[-1]
                try:
                    check_digest(name)
                except BlobNotFound:
                    continue
                yield StoredBlob(name, int(meta["size"]), meta["last_modified"].timestamp())
