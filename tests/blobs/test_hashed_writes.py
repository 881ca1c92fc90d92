"""A built blob hashed as it is written (blobs/hashed_writes.py): the digest is the file's when
every patch rewrites the same bytes; anything else says so (None), and the file is read back."""

from __future__ import annotations

import hashlib
import io
import os

from flplatform.blobs.hashed_writes import HashedWrites


def _written(steps: list[tuple[int | None, bytes]]) -> tuple[bytes, str | None]:
    """Each step: seek to the offset (None: stay), write the bytes."""
    raw = io.BytesIO()
    sink = HashedWrites(raw)
    for offset, data in steps:
        if offset is not None:
            raw.seek(offset)
        sink.write(data)
        raw.seek(0, os.SEEK_END)
    content = raw.getvalue()
    return content, sink.finish(len(content))


def test_appends_and_same_byte_patches_give_the_files_digest() -> None:
    big = os.urandom(3 * 1024**2)
    content, digest = _written([(None, b"head0000"), (None, big), (0, b"head0000"), (None, b"tail")])
    assert content == b"head0000" + big + b"tail"
    assert digest == hashlib.sha256(content).hexdigest()


def test_a_patch_with_other_bytes_or_a_hole_cannot_vouch() -> None:
    _, patched = _written([(None, b"head0000"), (None, b"data"), (0, b"HEAD0000")])
    assert patched is None
    _, hole = _written([(None, b"head"), (10, b"after a hole")])
    assert hole is None
    _, longer = _written([(None, b"head"), (None, b"data"), (0, b"head+data")])
    assert longer is None


def test_a_length_other_than_what_was_written_cannot_vouch() -> None:
    raw = io.BytesIO()
    sink = HashedWrites(raw)
    sink.write(b"0123456789")
    assert sink.finish(4) is None  # the file was cut after (a spare longer than the build, truncated)
