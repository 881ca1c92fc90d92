"""The default backend: one read-only file per blob under a directory.

Layout: ``ROOT/sha256/ab/cd/<digest>``; writers spool to ``ROOT/tmp/`` (the same filesystem, so
the final rename is atomic), fsync the file, rename it into place and fsync the directory. A
crash leaves at most a ``tmp/*.part`` file, which the sweep removes. Rewriting an existing blob
only refreshes its modification time (the sweep's grace period counts from there).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from flplatform.blobs.base import (
    READ_CHUNK,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobWriter,
    StoredBlob,
    blob_key,
    check_digest,
)

# A temporary file older than this belongs to a writer that died (the sweep removes it).
STALE_SPOOL_SECONDS = 24 * 3600


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.spool = self.root / "tmp"
        self.location = self.root.as_uri()

    def path(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def writer(self, *, max_bytes: int | None = None) -> BlobWriter:
        return BlobWriter(self.spool, self._finish, max_bytes=max_bytes)

    async def _finish(self, temp: Path, info: BlobInfo) -> None:
        await asyncio.to_thread(self._place, temp, info.digest)

    def _finish_sync(self, temp: Path, info: BlobInfo) -> None:
        self._place(temp, info.digest)

    def _place(self, temp: Path, digest: str) -> None:
        final = self.path(digest)
        if final.exists():
            temp.unlink(missing_ok=True)
            os.utime(final)  # written again: the grace period starts anew
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        temp.chmod(0o444)
        os.replace(temp, final)
        _fsync_dir(final.parent)

    async def local_path(self, digest: str) -> Path | None:
        path = self.path(digest)
        if not await asyncio.to_thread(path.exists):
            raise BlobNotFound(digest)
        return path

    async def stream(
        self, digest: str, *, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK
    ) -> AsyncIterator[bytes]:
        path = self.path(digest)
        try:
            file = await asyncio.to_thread(open, path, "rb", buffering=0)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        try:
            if start:
                await asyncio.to_thread(file.seek, start)
            position = start
            while end is None or position < end:
                want = chunk_size if end is None else min(chunk_size, end - position)
                chunk = await asyncio.to_thread(file.read, want)
                if not chunk:
                    break
                position += len(chunk)
                yield chunk
        finally:
            file.close()

    async def read(self, digest: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path(digest).read_bytes)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    async def size(self, digest: str) -> int:
        try:
            return (await asyncio.to_thread(self.path(digest).stat)).st_size
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    async def modified(self, digest: str) -> float:
        try:
            return (await asyncio.to_thread(self.path(digest).stat)).st_mtime
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    async def exists(self, digest: str) -> bool:
        return await asyncio.to_thread(self.path(digest).exists)

    async def delete(self, digest: str) -> None:
        await asyncio.to_thread(self.path(digest).unlink, missing_ok=True)

    async def list(self) -> AsyncIterator[StoredBlob]:
        def _scan() -> list[StoredBlob]:
            found: list[StoredBlob] = []
            base = self.root / "sha256"
            if not base.is_dir():
                return found
            for dirpath, _dirs, names in os.walk(base):
                for name in names:
                    try:
                        check_digest(name)
                        stat = os.stat(os.path.join(dirpath, name))
                    except (BlobNotFound, FileNotFoundError):
                        continue
                    found.append(StoredBlob(name, stat.st_size, stat.st_mtime))
            return found

        for blob in await asyncio.to_thread(_scan):
            yield blob

    def forget_cached(self, digests: Iterable[str]) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        for digest in digests:
            try:
                fd = os.open(self.path(digest), os.O_RDONLY)
            except OSError:
                continue
            try:
                # clean pages not mapped anywhere are freed at once; mapped ones are left alone
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    async def remove_stale_spool(self, older_than: float = STALE_SPOOL_SECONDS) -> int:
        """Delete temporary files of writers that died (older than ``older_than`` seconds)."""

        def _clean() -> int:
            if not self.spool.is_dir():
                return 0
            cutoff, removed = time.time() - older_than, 0
            for entry in os.scandir(self.spool):
                try:
                    if entry.is_file() and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
            return removed

        return await asyncio.to_thread(_clean)
