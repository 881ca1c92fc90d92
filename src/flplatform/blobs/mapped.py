"""A blob as a read-only memory map: the aggregation reads updates as zero-copy views of files.

On the filesystem backend the blob's own file is mapped (its pages are usually still in the page
cache from the upload: nothing is read or copied). Backends without a local file (S3) stream the
blob into a temporary file in the store's spool directory first, which is unlinked at once (the
mapping keeps it alive until it is unmapped). Either way the bytes never become a Python ``bytes``
object, and the mapped pages are file-backed: the kernel can drop them under memory pressure,
unlike anonymous memory. While a fold reads an update it drops the pages behind it
(:class:`PageReleaser`), so a mapped update costs a few chunks of resident memory, not its size.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from flplatform.blobs.base import BlobStore

_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class PageReleaser:
    """``release(address, nbytes)`` for a mapped view: drops the mapping's whole pages inside that
    byte range (``madvise(MADV_DONTNEED)``), so that they stop counting in the process's resident
    memory. The mapping is read-only and file-backed: a page touched again is simply mapped again
    from the page cache (or re-read from the file), with the same bytes. Ranges outside the view,
    and platforms without ``MADV_DONTNEED``, are ignored. The aggregation's release hook
    (:data:`flplatform.aggregation.kernels.Release`)."""

    def __init__(self, view: memoryview):
        self.mapping = view.obj if isinstance(view.obj, mmap.mmap) else None
        self.size = view.nbytes
        self.base = 0
        if self.mapping is not None and self.size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: only its address is read
                self.base = torch.frombuffer(view, dtype=torch.uint8).data_ptr()

    def pages(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """The page-aligned interior of the range as (offset, length) in the mapping (the mapping's
        last, partial page counts when the range reaches the end), or None when there is none."""
        offset = address - self.base
        end = offset + nbytes
        if offset < 0 or nbytes <= 0 or end > self.size:
            return None
        page = mmap.PAGESIZE
        start = -(-offset // page) * page
        stop = self.size if end == self.size else end // page * page
        return (start, stop - start) if stop > start else None

    def __call__(self, address: int, nbytes: int) -> None:
        if self.mapping is None or _DONTNEED is None:
            return
        pages = self.pages(address, nbytes)
        if pages is not None:
            with contextlib.suppress(OSError, ValueError):
                self.mapping.madvise(_DONTNEED, *pages)


def _map(path: Path) -> tuple[mmap.mmap | None, memoryview]:
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:  # an empty file cannot be mapped
            return None, memoryview(b"")
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    with contextlib.suppress(AttributeError, OSError):  # read front to back, once
        mapping.madvise(mmap.MADV_SEQUENTIAL)
    return mapping, memoryview(mapping)


async def _spool(store: BlobStore, digest: str) -> Path:
    """The blob streamed into a temporary file of the store's spool directory."""
    store.spool.mkdir(parents=True, exist_ok=True)
    path = store.spool / f"{uuid.uuid4().hex}.map"
    file = await asyncio.to_thread(open, path, "xb")
    try:
        async for chunk in store.stream(digest):
            await asyncio.to_thread(file.write, chunk)
    except BaseException:
        file.close()
        path.unlink(missing_ok=True)
        raise
    file.close()
    return path


@contextlib.asynccontextmanager
async def mapped(store: BlobStore, digest: str) -> AsyncIterator[memoryview]:
    """The blob ``digest`` as a read-only ``memoryview`` of a memory map (raises ``BlobNotFound``).

    Tensors made from the view may outlive the block: the mapping stays until they are gone."""
    path = await store.local_path(digest)
    temporary = path is None
    if path is None:
        path = await _spool(store, digest)
    try:
        mapping, view = await asyncio.to_thread(_map, path)
    finally:
        if temporary:
            path.unlink(missing_ok=True)  # the mapping keeps the inode until it is unmapped
    # Never closed explicitly: ``torch.frombuffer`` keeps a reference to the view, not a buffer export,
    # so closing the map under a live tensor would not fail but leave it dangling. Dropping our
    # references unmaps it as soon as the last tensor viewing it is gone (at once for an update that
    # was folded; at the round's close for one a robust aggregator keeps).
    try:
        yield view
    finally:
        del view, mapping
