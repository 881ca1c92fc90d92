"""Getting a built blob's bytes to disk sooner: writeback started while the file is still being
written, and the final ``fsync`` overlapped with hashing the file.

A blob built in place (:meth:`~flplatform.blobs.base.BlobWriter.commit_built`: a round's new global
model) used to be written whole into the page cache, then hashed, then fsynced: the fsync found the
whole file dirty and waited for all of it (68 MB at this disk's 340–570 MB/s: 0.12–0.2 s, on the
round's critical path; docs/performance.md). :class:`WritebackFile` asks the kernel to start writing
each :data:`WRITEBACK_BYTES` out as soon as it is written (Linux ``sync_file_range(…,
SYNC_FILE_RANGE_WRITE)``: asynchronous, it does not wait for the disk, and it changes nothing about
durability: the fsync that follows still waits for every byte), and :func:`hash_while_syncing`
runs the fsync in a second thread while this one reads the file back (from the page cache) and
hashes it. Where ``sync_file_range`` does not exist (not Linux) only the overlap remains.

A new file also needs fresh page-cache pages, and on a VM whose balloon device reports free pages
to the host (Firecracker, QEMU with ``free-page-reporting``) the first touch of memory the guest
freed a while ago faults into the host: writing a 68 MB archive took 31-47 ms in some rounds and
124-177 ms in others (docs/performance.md). So after a built blob is published, :func:`warm_spare`
prepares the next one's file off the critical path (disk blocks allocated, pages read into the page
cache, no data written), and :func:`take_spare` hands it to the next build, which overwrites those
pages in place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

#: Writeback is started for every this many bytes written (and for the rest at the end).
WRITEBACK_BYTES = 8 * 1024**2
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: initiate writeback of dirty pages not under writeback yet


def _load_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk now, without
    waiting for it (``nbytes`` 0: to the end of the file). False where it is not available or the
    call failed (nothing else happens: the later fsync does all the work, as before)."""
    if _sync_file_range is None:
        return False
    return bool(_sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0)


class WritebackFile:
    """A seekable binary file (what ``zipfile`` writes into) that starts the writeback of what was
    written every :data:`WRITEBACK_BYTES`. Large writes are passed on in pieces of that size, so a
    model-sized tensor written in one call is on its way to disk while the rest of it is copied.
    Everything else is the wrapped file's."""

    def __init__(self, file: IO[bytes], every: int | None = None):
        self._file = file
        self._fd = file.fileno()
        self._every = every or WRITEBACK_BYTES
        self._pending = 0  # bytes written since writeback was last started
        self.end = 0  # the furthest byte written (the file's length, also over a longer spare)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        done = 0
        while done < total:
            piece = view[done : done + self._every]
            written = self._file.write(piece)
            done += written if written is not None else len(piece)
            self._pending += written if written is not None else len(piece)
            if self._pending >= self._every:
                self.start()
        self.end = max(self.end, self._file.tell())
        return total

    def start(self) -> None:
        """Start the writeback of every dirty page of the file (pages already being written are
        skipped by the kernel; a header ``zipfile`` patched behind the data is dirty again)."""
        self._file.flush()
        start_writeback(self._fd, 0, 0)
        self._pending = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def hash_while_syncing(
    fd: int, *, chunk: int = 1024**2, hashed: Callable[[], str | None] | None = None
) -> str:
    """SHA-256 of the whole file ``fd`` (read with ``pread`` from the page cache) while a second
    thread ``fsync``\\ s it; returns the hex digest once both are done (an fsync error is raised).
    ``hashed`` (optional) gives the digest if the file was hashed as it was written
    (:class:`~flplatform.blobs.hashed_writes.HashedWrites`), or None to read it back."""
    failure: list[BaseException] = []

    def sync() -> None:
        try:
            os.fsync(fd)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    syncer = threading.Thread(target=sync, name="blob-fsync", daemon=True)
    syncer.start()
    hasher = hashlib.sha256()
    offset = 0
    try:
        digest = hashed() if hashed is not None else None
        while digest is None and (data := os.pread(fd, chunk, offset)):
            hasher.update(data)
            offset += len(data)
    finally:
        syncer.join()
    if failure:
        raise failure[0]
    return digest if digest is not None else hasher.hexdigest()


#: Built blobs from this size on leave a spare file for the next build (:func:`warm_spare`).
SPARE_MIN_BYTES = 8 * 1024**2
_SPARE_PREFIX = "spare-"


def _spare_path(spool_dir: Path) -> Path:
    # one per process: the workers of a server share the spool directory
    return spool_dir / f"{_SPARE_PREFIX}{os.getpid()}.part"


def take_spare(spool_dir: Path, path: Path) -> int | None:
    """This process's spare file moved to ``path`` and opened for reading and writing (its pages
    are in the page cache; the caller writes from offset 0 and truncates to what it wrote), or None
    when there is none."""
    try:
        os.rename(_spare_path(spool_dir), path)
    except OSError:
        return None
    try:
        return os.open(path, os.O_RDWR)
    except OSError:
        path.unlink(missing_ok=True)
        return None


def start_spare(spool_dir: Path, size: int, *, unless_present: bool = False) -> None:
    """:func:`warm_spare` in a background thread (``unless_present``: only when this process has
    no spare yet)."""
    if size < SPARE_MIN_BYTES or (unless_present and _spare_path(spool_dir).exists()):
        return
    threading.Thread(target=warm_spare, args=(spool_dir, size), name="blob-spare", daemon=True).start()


def warm_spare(spool_dir: Path, size: int) -> None:
    """Prepare this process's spare file of ``size`` bytes (blocking: run it in a thread): disk
    blocks allocated without writing them (``posix_fallocate``) and read once, which puts zero pages
    of the file in the page cache at no disk cost. Replaces an older spare; any failure (no space,
    no ``posix_fallocate``) leaves no spare and the next build starts a fresh file as before."""
    if size < SPARE_MIN_BYTES or not hasattr(os, "posix_fallocate"):
        return
    temp = spool_dir / f"{uuid.uuid4().hex}.part"
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, size)
        buffer = bytearray(1024**2)
        offset = 0
        while read := os.preadv(fd, [buffer], offset):
            offset += read
        os.replace(temp, _spare_path(spool_dir))
    except OSError:
        temp.unlink(missing_ok=True)
    finally:
        os.close(fd)
