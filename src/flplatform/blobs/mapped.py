"""A blob as a read-only memory map: the aggregation reads updates as zero-copy views of files.

On the filesystem backend the blob's own file is mapped (its pages are usually still in the page
cache from the upload: nothing is read or copied). Backends without a local file (S3) stream the
blob into a temporary file in the store's spool directory first, which is unlinked at once (the
mapping keeps it alive until it is unmapped). Either way the bytes never become a Python ``bytes``
object, and the mapped pages are file-backed: the kernel can drop them under memory pressure,
unlike anonymous memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from flplatform.blobs.base import BlobStore


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
