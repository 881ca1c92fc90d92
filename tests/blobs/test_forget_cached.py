"""A closed round's updates leave the page cache (issue 21): ``BlobStore.forget_cached`` drops a
blob's pages, its bytes stay stored and read back the same."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from flplatform.blobs import BlobStore, FileBlobStore
from tests.page_cache import page_cache_can_be_dropped, resident_pages


async def test_forget_cached_drops_a_blobs_pages_and_keeps_its_bytes(
    store: BlobStore, tmp_path: Path
) -> None:
    data = os.urandom(1 << 20)
    kept = os.urandom(1 << 16)
    info = await store.put(data)
    other = await store.put(kept)
    assert await store.read(info.digest) == data  # in the page cache now (where there is one)
    missing = "0" * 64
    # a missing blob is skipped; the other blob is left alone
    await asyncio.to_thread(store.forget_cached, [info.digest, missing])
    assert await store.read(info.digest) == data
    if not isinstance(store, FileBlobStore):
        return  # nothing local to drop (S3: the mapped copies are unlinked temporary files)
    if not page_cache_can_be_dropped(tmp_path):
        pytest.skip("this filesystem keeps fadvised pages (tmpfs) or this is not Linux")
    store.forget_cached([info.digest])
    assert resident_pages(store.path(info.digest)) == 0
    assert resident_pages(store.path(other.digest)) > 0
