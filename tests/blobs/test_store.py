"""The blob store's contract, on the filesystem and on S3 (moto): content addressing, streaming
writes that leave nothing when aborted, ranged streaming reads, size/exists/delete, listing."""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from flplatform.blobs import (
    BlobNotFound,
    BlobStore,
    BlobTooLarge,
    FileBlobStore,
    blob_key,
    default_blob_dir,
    open_store,
)
from flplatform.settings import Settings
from tests.page_cache import resident_pages


def _spooled(store: BlobStore) -> list[str]:
    spool = store.spool
    return sorted(os.listdir(spool)) if spool.exists() else []


async def test_put_is_content_addressed_and_idempotent(store: BlobStore) -> None:
    data = os.urandom(3 * 1024**2 + 17)
    info = await store.put(data)
    assert info.digest == hashlib.sha256(data).hexdigest() and info.size == len(data)
    again = await store.put(data)
    assert again == info
    assert await store.exists(info.digest)
    assert await store.size(info.digest) == len(data)
    assert await store.read(info.digest) == data
    assert [b.digest async for b in store.list()] == [info.digest]
    assert _spooled(store) == []


async def test_streaming_writer_hashes_chunks(store: BlobStore) -> None:
    chunks = [os.urandom(n) for n in (1, 65536, 2 * 1024**2, 0, 5)]
    writer = store.writer()
    for chunk in chunks:
        await writer.write(chunk)
    info = await writer.commit()
    whole = b"".join(chunks)
    assert info.digest == hashlib.sha256(whole).hexdigest() and info.size == len(whole)
    assert b"".join([c async for c in store.stream(info.digest, chunk_size=100_000)]) == whole


async def test_empty_blob(store: BlobStore) -> None:
    info = await store.put(b"")
    assert info.size == 0 and await store.read(info.digest) == b""


async def test_ranges(store: BlobStore) -> None:
    data = bytes(range(256)) * 1000
    info = await store.put(data)
    for start, end in ((0, 10), (100, 255_999), (1000, None), (255_999, 256_000), (5, 5)):
        got = b"".join([c async for c in store.stream(info.digest, start=start, end=end)])
        assert got == data[start:end], (start, end)


async def test_abort_and_failures_leave_nothing(store: BlobStore) -> None:
    async with store.writer() as writer:
        await writer.write(os.urandom(2 * 1024**2))
        # no commit: leaving the block aborts
    assert [b async for b in store.list()] == []
    assert _spooled(store) == []

    with pytest.raises(RuntimeError):
        async with store.writer() as writer:
            await writer.write(b"x" * 10)
            raise RuntimeError("client went away")
    assert [b async for b in store.list()] == [] and _spooled(store) == []

    writer = store.writer(max_bytes=1000)
    await writer.write(b"a" * 1000)
    with pytest.raises(BlobTooLarge):
        await writer.write(b"b")
    assert [b async for b in store.list()] == [] and _spooled(store) == []


async def test_cancelled_writer_leaves_nothing(store: BlobStore) -> None:
    started = asyncio.Event()

    async def upload() -> None:
        async with store.writer() as writer:
            await writer.write(os.urandom(2 * 1024**2))
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(upload())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [b async for b in store.list()] == [] and _spooled(store) == []


async def test_missing_and_delete(store: BlobStore) -> None:
    missing = "0" * 64
    assert not await store.exists(missing)
    with pytest.raises(BlobNotFound):
        await store.size(missing)
    with pytest.raises(BlobNotFound):
        await store.read(missing)
    with pytest.raises(BlobNotFound):
        [c async for c in store.stream(missing)]
    await store.delete(missing)  # nothing to delete: no error
    info = await store.put(b"to be deleted")
    await store.delete(info.digest)
    assert not await store.exists(info.digest)
    with pytest.raises(BlobNotFound):
        await store.exists("../../etc/passwd") or await store.size("../../etc/passwd")


async def test_concurrent_writers_of_the_same_bytes(store: BlobStore) -> None:
    data = os.urandom(1024**2)
    infos = await asyncio.gather(*(store.put(data) for _ in range(4)))
    assert len({i.digest for i in infos}) == 1
    assert await store.read(infos[0].digest) == data
    assert _spooled(store) == []


async def test_filesystem_layout_local_path_and_stale_spool(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "b")
    info = await store.put(b"weights")
    path = await store.local_path(info.digest)
    assert path == tmp_path / "b" / blob_key(info.digest)
    assert path is not None and path.read_bytes() == b"weights"
    assert not os.access(path, os.W_OK) or os.geteuid() == 0  # read-only (root may write anyway)
    assert path.stat().st_mode & 0o222 == 0
    with pytest.raises(BlobNotFound):
        await store.local_path("1" * 64)
    (tmp_path / "b" / "tmp").mkdir(exist_ok=True)
    stale = tmp_path / "b" / "tmp" / "dead.part"
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))
    assert await store.remove_stale_spool() == 1 and not stale.exists()


async def test_s3_keeps_no_local_path(s3_endpoint: str, tmp_path: Path) -> None:
    from tests.blobs.conftest import make_s3_store

    store = make_s3_store(s3_endpoint, tmp_path)
    info = await store.put(b"x")
    assert await store.local_path(info.digest) is None


def test_settings_choose_the_store(tmp_path: Path) -> None:
    db = tmp_path / "data" / "flp.db"
    assert default_blob_dir(f"sqlite+aiosqlite:///{db}") == tmp_path / "data" / "blobs"
    assert default_blob_dir("postgresql+asyncpg://u@h/db") == Path("blobs").absolute()
    settings = Settings(database_url=f"sqlite+aiosqlite:///{db}", blob_dir=None)
    store = open_store(settings)
    assert isinstance(store, FileBlobStore) and store.root == tmp_path / "data" / "blobs"
    assert open_store(settings) is store
    explicit = open_store(Settings(database_url=f"sqlite+aiosqlite:///{db}", blob_dir=tmp_path / "x"))
    assert isinstance(explicit, FileBlobStore) and explicit.root == tmp_path / "x"
    s3 = open_store(
        Settings(
            blob_url="s3://bucket/some/prefix/",
            blob_s3_endpoint="http://127.0.0.1:9",
            blob_s3_access_key_id="a",
            blob_s3_secret_access_key="b",
        )
    )
    assert s3.location == "s3://bucket/some/prefix"


@pytest.mark.parametrize("writeback", [True, False], ids=["writeback", "no-sync_file_range"])
async def test_commit_built_zip_with_headers_patched_behind(
    store: BlobStore, writeback: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob built in place (a zip: each entry's header is patched after its data), its writeback
    started every few bytes while it is written and its fsync overlapped with the hash: the digest is
    the SHA-256 of exactly the published bytes, with or without ``sync_file_range``."""
    import io
    import zipfile

    from flplatform.blobs import writeback as wb

    if not writeback:
        monkeypatch.setattr(wb, "_sync_file_range", None)
    monkeypatch.setattr(wb, "WRITEBACK_BYTES", 64 * 1024)
    started: list[bool] = []
    real = wb.start_writeback
    monkeypatch.setattr(wb, "start_writeback", lambda *a: started.append(real(*a)) or started[-1])
    payload = os.urandom(3 * 1024**2 + 5)

    def build(sink: Any) -> None:
        with zipfile.ZipFile(sink, "w") as archive:
            archive.writestr("m/code.py", b"x" * 1000)
            entry = zipfile.ZipInfo("m/data/0")
            entry.file_size = len(payload)
            with archive.open(entry, "w") as out:
                out.write(payload)  # one large write: passed on in pieces
            archive.writestr("m/version", b"3")

    info = await store.writer().commit_built(build)
    data = await store.read(info.digest)
    assert info.digest == hashlib.sha256(data).hexdigest() and info.size == len(data)
    assert zipfile.ZipFile(io.BytesIO(data)).read("m/data/0") == payload
    assert _spooled(store) == []
    if isinstance(store, FileBlobStore):  # S3 builds in its spool the same way
        assert len(started) > 3  # while it was written, not only at the end
        assert all(started) == (writeback and sys.platform.startswith("linux"))


def test_writeback_file_passes_large_writes_on_in_pieces(tmp_path: Path) -> None:
    from flplatform.blobs.writeback import WritebackFile, hash_while_syncing

    data = os.urandom(1_000_003)
    with open(tmp_path / "f", "w+b") as file:
        sink = WritebackFile(file, every=4096)
        assert sink.write(memoryview(data)) == len(data)
        sink.start()
        assert sink.tell() == len(data)  # everything else is the file's
        assert hash_while_syncing(file.fileno(), chunk=65536) == hashlib.sha256(data).hexdigest()


async def test_a_built_blob_leaves_a_spare_file_that_the_next_build_overwrites(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a built blob is published, a spare file of its size waits in the spool (blocks
    allocated, pages read into the page cache); the next build writes into it, shorter than it here,
    and publishes exactly what it wrote."""
    from flplatform.blobs import writeback as wb

    monkeypatch.setattr(wb, "SPARE_MIN_BYTES", 64 * 1024)
    spare = store.spool / f"spare-{os.getpid()}.part"

    async def spare_of_size(size: int) -> None:
        for _ in range(500):
            if spare.exists() and spare.stat().st_size == size:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no spare of {size} bytes: {_spooled(store)}")

    first, second = os.urandom(300_000), os.urandom(200_001)
    info = await store.writer().commit_built(lambda sink: sink.write(first))
    await spare_of_size(len(first))
    inode = spare.stat().st_ino
    if sys.platform.startswith("linux"):  # its pages were read into the page cache
        assert resident_pages(spare) == -(-len(first) // mmap.PAGESIZE)
    again = await store.writer().commit_built(lambda sink: sink.write(second))
    if isinstance(store, FileBlobStore):  # the spare itself became the blob
        assert store.path(again.digest).stat().st_ino == inode
    data = await store.read(again.digest)
    assert data == second and again.size == len(second)
    assert again.digest == hashlib.sha256(second).hexdigest()
    assert await store.read(info.digest) == first
    await spare_of_size(len(second))  # the spare was used, and a new one prepared
    assert _spooled(store) == [spare.name]


async def test_prepare_spare_makes_one_unless_present(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round's first close gets a spare too: prepared ahead (sized like the current global)
    when this process has none, left alone when it has one."""
    from flplatform.blobs import writeback as wb

    monkeypatch.setattr(wb, "SPARE_MIN_BYTES", 64 * 1024)
    spare = store.spool / f"spare-{os.getpid()}.part"
    store.spool.mkdir(parents=True, exist_ok=True)
    store.prepare_spare(1000)  # under the minimum: nothing
    store.prepare_spare(100_000)
    for _ in range(500):
        if spare.exists() and spare.stat().st_size == 100_000:
            break
        await asyncio.sleep(0.01)
    inode = spare.stat().st_ino
    store.prepare_spare(200_000)  # one is present: kept
    await asyncio.sleep(0.2)
    assert spare.stat().st_ino == inode and spare.stat().st_size == 100_000
