"""A built blob hashed while it is written: SHA-256 of the bytes in file order, in a thread of its
own, so that hashing overlaps the build instead of reading the file back after it.

A round's new global model is built in place (:meth:`~flplatform.blobs.base.BlobWriter.commit_built`)
by ``zipfile``, which writes each entry's local header, its data, and then seeks back to patch the
header with the entry's CRC and size. Bytes that may still change cannot be hashed yet, and SHA-256
is sequential: so the builder makes each header final from the start (it knows the CRC before it
writes the data: :mod:`flplatform.models.archive_weights`), and a patch that rewrites the same bytes
keeps the hash valid. Anything else (a patch with other bytes, a write past a hole) makes
:meth:`HashedWrites.finish` return None, and the caller hashes the file by reading it back, as
before. Writes are queued by reference: the data must not change after ``write`` returns
(``bytes``, or a tensor's memory the builder keeps alive until :meth:`finish`).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import IO, Any

#: Writes up to this size are remembered, to compare a later patch of them (zip headers).
PATCHABLE_BYTES = 64 * 1024


class HashedWrites:
    """Wraps a seekable binary file (its ``write``, ``tell`` and ``seek`` are used)."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._end = 0  # bytes [0, _end) are queued for the hash
        self._valid = True
        self._small: dict[int, bytes] = {}  # offset -> a small write there (a header, maybe patched)
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._hasher = hashlib.sha256()
        self._thread = threading.Thread(target=self._hash, name="blob-hash", daemon=True)
        self._thread.start()
        self._finished = False

    def _hash(self) -> None:
        while (view := self._queue.get()) is not None:
            self._hasher.update(view)  # releases the GIL for large pieces

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        position = self._file.tell()
        if position == self._end:
            self._queue.put(view)
            self._end += len(view)
            if len(view) <= PATCHABLE_BYTES:
                self._small[position] = bytes(view)
        elif self._small.get(position) != bytes(view[: PATCHABLE_BYTES + 1]):
            self._valid = False  # not the same bytes again: what was hashed is not the file
        return self._file.write(data)

    @property
    def end(self) -> int:
        return self._end

    def finish(self, length: int) -> str | None:
        """The hex digest of the file's first ``length`` bytes (its length once built), or None
        when what was written cannot vouch for them. Always call it (it ends the thread)."""
        if not self._finished:
            self._finished = True
            self._queue.put(None)
            self._thread.join()
        return self._hasher.hexdigest() if self._valid and length == self._end else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)
