"""The blob store's contract: content-addressed, immutable blobs written once through a streaming
writer that hashes while it writes.

A blob's name is the SHA-256 of its bytes (64 lowercase hex digits, its *digest*). Writing the
same bytes twice stores them once. A writer takes chunks, hashes them and spools them to a
temporary file off the event loop (``asyncio.to_thread``), then hands the finished file to the
backend (a rename on the filesystem, an upload to S3); an aborted or failed writer leaves nothing
behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, cast

from flplatform.blobs.hashed_writes import HashedWrites
from flplatform.blobs.writeback import WritebackFile, hash_while_syncing, start_spare, take_spare
from flplatform.kit import timeline

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# Chunks smaller than this are gathered before a worker thread writes and hashes them (one thread
# hop per MiB, not per network read).
FLUSH_BYTES = 1024**2
READ_CHUNK = 1024**2


class BlobError(Exception):
    """A blob store failure (the backend's message, never a secret)."""


class BlobNotFound(BlobError, KeyError):
    """No blob with this digest in the store."""


class BlobTooLarge(BlobError):
    """A writer went past its ``max_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the blob is larger than {limit} bytes")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """One blob as the store lists it (for the sweep): digest, size, last written (epoch seconds)."""

    digest: str
    size: int
    modified: float


def check_digest(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise BlobNotFound(f"not a blob digest: {digest!r}")
    return digest


def blob_key(digest: str) -> str:
    """Where a blob lives below the store's root: ``sha256/ab/cd/abcd…`` (two fan-out levels)."""
    check_digest(digest)
    return f"sha256/{digest[:2]}/{digest[2:4]}/{digest}"


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """SHA-256 of ``data`` (call it in a thread for large data: hashlib releases the GIL)."""
    return hashlib.sha256(data).hexdigest()


FinishFn = Callable[[Path, BlobInfo], Awaitable[None]]


class BlobWriter:
    """Streams one blob: ``await write(chunk)`` any number of times, then ``await commit()``
    (returns digest and size) or ``await abort()``. As an async context manager it aborts unless
    committed. The bytes go to a temporary file in ``spool_dir`` while they are hashed; the
    backend's ``finish`` then makes the blob visible under its digest (or discards a duplicate)."""

    def __init__(self, spool_dir: Path, finish: FinishFn, *, max_bytes: int | None = None) -> None:
        self._spool_dir = spool_dir
        self._finish = finish
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self._built_digest: str | None = None  # commit_built hashes the finished file itself
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._size = 0
        self._observer: Callable[[int, memoryview], None] | None = None
        self._observed = 0  # bytes passed to the observer so far
        self._file: IO[bytes] | None = None
        self._path = spool_dir / f"{uuid.uuid4().hex}.part"
        self._done = False
        self._sealed = False

    @property
    def size(self) -> int:
        return self._size

    def observe(self, observer: Callable[[int, memoryview], None]) -> None:
        """Show every byte to ``observer(offset, chunk)`` as it is written: in the writer's worker
        thread, in order, while the chunk is hashed (in cache). It must not raise (it records what it
        finds for its owner to read after :meth:`seal`)."""
        self._observer = observer

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._done or self._sealed:
            raise BlobError("the writer is closed")
        if not chunk:
            return
        size = len(chunk)
        if self._max_bytes is not None and self._size + size > self._max_bytes:
            await self.abort()
            raise BlobTooLarge(self._max_bytes)
        self._size += size
        # Immutable input is kept as it is; a mutable buffer is copied (the caller may reuse it).
        self._pending.append(
            chunk
            if isinstance(chunk, bytes) or (isinstance(chunk, memoryview) and chunk.readonly)
            else bytes(chunk)
        )
        self._pending_size += size
        if self._pending_size >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        chunks, self._pending, self._pending_size = self._pending, [], 0
        if chunks:
            try:
                await asyncio.to_thread(self._write_sync, chunks)
            except BaseException:
                await self.abort()
                raise

    def _write_sync(self, chunks: list[bytes | memoryview]) -> None:
        if self._file is None:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._file = os.fdopen(fd, "wb", buffering=0)
        for chunk in chunks:
            self._hash.update(chunk)
            view = memoryview(chunk)
            if self._observer is not None:
                self._observer(self._observed, view)
                self._observed += len(view)
            while view:
                written = self._file.write(view)
                view = view[written or 0 :]

    def _close_sync(self, *, sync: bool) -> None:
        if self._file is None:  # an empty blob: still a file
            self._write_sync([])
        assert self._file is not None
        if sync:
            os.fsync(self._file.fileno())
        self._file.close()

    async def seal(self) -> Path:
        """Finish writing (flush, fsync, close) without publishing: the returned temporary file
        holds every byte and may be read (memory-mapped, checked) before ``commit()`` publishes it
        or ``abort()`` deletes it. Idempotent; ``write`` is refused afterwards."""
        if self._done:
            raise BlobError("the writer is closed")
        if not self._sealed:
            await self._flush()
            try:
                await asyncio.to_thread(self._close_sync, sync=True)
            except BaseException:
                await self.abort()
                raise
            self._sealed = True
        return self._path

    @property
    def info(self) -> BlobInfo:
        """Digest and size of a sealed writer's bytes (before it is committed)."""
        if not self._sealed:
            raise BlobError("the writer is not sealed")
        return BlobInfo(self._digest(), self._size)

    def _digest(self) -> str:
        return self._built_digest if self._built_digest is not None else self._hash.hexdigest()

    async def commit(self) -> BlobInfo:
        if self._done:
            raise BlobError("the writer is closed")
        await self.seal()
        try:
            info = BlobInfo(self._digest(), self._size)
            await self._finish(self._path, info)
            timeline.mark("blob_published")
        except BaseException:
            await self.abort()
            raise
        self._done = True
        return info

    async def commit_built(self, build: Callable[[IO[bytes]], None]) -> BlobInfo:
        """Publish what ``build(file)`` writes (in a worker thread) into the writer's temporary file
        itself: a seekable file, for formats whose writer patches headers after the data (zip).
        Nothing is held in memory; the file's writeback starts while it is built
        (:class:`~flplatform.blobs.writeback.WritebackFile`), it is hashed in another thread as it is
        written (:class:`~flplatform.blobs.hashed_writes.HashedWrites`: patches must rewrite the same
        bytes, else it is read back from the page cache and hashed once built), fsynced meanwhile,
        and published as :meth:`commit` does. Only on a fresh writer (nothing written yet)."""
        if self._done or self._sealed or self._size or self._file is not None:
            raise BlobError("commit_built needs a fresh writer")

        def _build() -> None:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            fd = take_spare(self._spool_dir, self._path)  # pages already in the page cache
            if fd is None:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w+b") as file:
                sink = WritebackFile(file)  # its pages start going to disk as they are written
                hashed = HashedWrites(cast(IO[bytes], sink))  # ... and are hashed in a thread meanwhile
                try:
                    build(cast(IO[bytes], hashed))
                    file.flush()
                    os.ftruncate(fd, sink.end)  # a spare may be longer than what was built
                    sink.start()  # the rest
                    timeline.mark("blob_built")
                    size = os.fstat(fd).st_size
                    if self._max_bytes is not None and size > self._max_bytes:
                        raise BlobTooLarge(self._max_bytes)
                    # Hashed as written (else read back) while another thread fsyncs.
                    digest = hash_while_syncing(fd, chunk=READ_CHUNK, hashed=lambda: hashed.finish(size))
                finally:
                    hashed.finish(0)  # ends its thread (a no-op once finished)
                timeline.mark("blob_hashed_and_fsynced")
            self._size, self._built_digest = size, digest

        try:
            await asyncio.to_thread(_build)
        except BaseException:
            await self.abort()
            raise
        self._sealed = True
        info = await self.commit()
        # the next build (the next round's global, about as large) gets pages touched beforehand
        start_spare(self._spool_dir, info.size)
        return info

    async def abort(self) -> None:
        """Drop everything written so far (idempotent)."""
        if self._done:
            return
        self._done = True
        self._pending = []
        file, self._file = self._file, None

        def _drop() -> None:
            if file is not None:
                file.close()
            self._path.unlink(missing_ok=True)

        await asyncio.shield(asyncio.to_thread(_drop))

    async def __aenter__(self) -> BlobWriter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.abort()


class BlobStore(ABC):
    """One content-addressed store (filesystem or S3). Every method is safe to call from many
    tasks and processes at once: blobs are immutable, and writing one is idempotent."""

    #: ``file://…`` or ``s3://…``: where the blobs live, for logs and docs (never credentials).
    location: str
    #: Local directory of the writers' temporary files.
    spool: Path

    @abstractmethod
    def writer(self, *, max_bytes: int | None = None) -> BlobWriter:
        """A new streaming writer (nothing is written until its first chunk)."""

    async def put(self, data: bytes | bytearray | memoryview) -> BlobInfo:
        """Store ``data`` whole (hashed in a worker thread); returns its digest and size."""
        async with self.writer() as writer:
            view = memoryview(data)
            for start in range(0, len(view), 8 * FLUSH_BYTES):
                await writer.write(view[start : start + 8 * FLUSH_BYTES])
            return await writer.commit()

    def put_sync(self, data: bytes | bytearray | memoryview) -> BlobInfo:
        """``put`` for synchronous callers (the data migration): blocks while it writes."""
        info = BlobInfo(digest_of(data), len(data))
        self.spool.mkdir(parents=True, exist_ok=True)
        temp = self.spool / f"{uuid.uuid4().hex}.part"
        try:
            with open(temp, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            self._finish_sync(temp, info)
        finally:
            temp.unlink(missing_ok=True)
        return info

    @abstractmethod
    def _finish_sync(self, temp: Path, info: BlobInfo) -> None:
        """Make the finished temporary file ``temp`` the blob ``info.digest`` (blocking)."""

    @abstractmethod
    def stream(
        self, digest: str, *, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK
    ) -> AsyncIterator[bytes]:
        """The blob's bytes ``[start, end)`` in chunks; raises ``BlobNotFound`` on first use."""

    async def read(self, digest: str) -> bytes:
        """The whole blob in memory (small blobs; large ones: ``stream`` or ``local_path``)."""
        parts = [chunk async for chunk in self.stream(digest)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def local_path(self, digest: str) -> Path | None:
        """A local file holding the blob, for memory-mapping; ``None`` where the backend keeps no
        local file (S3). The file is read-only and never changes while it exists."""
        return None

    @abstractmethod
    async def size(self, digest: str) -> int:
        """Size in bytes; raises ``BlobNotFound``."""

    @abstractmethod
    async def exists(self, digest: str) -> bool: ...

    @abstractmethod
    async def modified(self, digest: str) -> float:
        """When the blob was last written (epoch seconds); raises ``BlobNotFound``."""

    @abstractmethod
    async def delete(self, digest: str) -> None:
        """Remove the blob (nothing happens if it is already gone)."""

    @abstractmethod
    def list(self) -> AsyncIterator[StoredBlob]:
        """Every blob in the store (for the sweep)."""

    def prepare_spare(self, size: int) -> None:
        """Have a spare file ready in the background for a blob of about ``size`` bytes that will be
        built in place soon (a round's new global: :meth:`BlobWriter.commit_built`), unless this
        process has one; each build leaves one for the next (see :mod:`.writeback`)."""
        spool = getattr(self, "spool", None)
        if isinstance(spool, Path):
            start_spare(spool, size, unless_present=True)

    def forget_cached(self, digests: Iterable[str]) -> None:  # noqa: B027 - optional hook
        """Drop these blobs' pages from this machine's page cache (blocking: run it in a thread);
        for blobs that will not be read again soon, such as a closed round's updates. Their bytes
        stay stored; a later read comes from disk. Backends without local files do nothing."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the backend's resources."""
