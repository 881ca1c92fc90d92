"""New weights in a TorchScript archive without loading it: the zip's entries copied, its tensor
storages (``<archive>/data/<key>``: raw little-endian bytes) replaced.

A round's new global model is the template archive with other weights. Loading and saving it in the
model sandbox costs seconds for a large model (two model-sized transfers, ``torch.jit.load`` and
``save``), most of a round's close. A *storage plan* says which ``data/`` entry holds which state-dict
tensor, one to one and whole; with it the archive is rebuilt here: every entry copied as it is
(code, pickles, constants; stored uncompressed, with headers final from the start, so that the
blob is hashed as it is written) except the planned storages, written from the new tensors. Nothing is
unpickled or executed (the same code entries as the template, byte for byte), so the archive is as
safe as the template was.

The plan is learnt by content, not by reading the pickles: from an archive and the state dict it
holds (the sandbox decoded or built it), each tensor's bytes must equal exactly one ``data/`` entry,
and no two tensors the same entry. Anything else (tensors sharing a storage, views into a larger
one, tensors with equal bytes, such as two zero biases) gives no plan, and the caller keeps the
sandbox path. A plan holds for every archive with the same entries and sizes: each round's output.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
from collections.abc import Mapping
from typing import IO

import torch
from isal import isal_zlib

# zipfile takes the CRC-32 of every byte it writes (and reads) with zlib's crc32: 1.4 GB/s on this
# project's 2-core machines, ≈ 45 ms of a 68 MB round's archive build. ISA-L's gives the same values
# (the same polynomial; tests/models/test_archive_weights.py checks) ≈ 5x faster, releasing the GIL.
zipfile.crc32 = isal_zlib.crc32  # type: ignore[attr-defined]

Plan = dict[str, str]  # state-dict name -> zip entry name of its storage
#: An archive: in memory, or a file (a blob of the store, read piecewise, never whole).
Archive = bytes | memoryview | str | os.PathLike[str]
_COPY_CHUNK = 1024**2


def _zip(archive: Archive) -> zipfile.ZipFile:
    if isinstance(archive, (bytes, memoryview)):
        return zipfile.ZipFile(io.BytesIO(archive))
    return zipfile.ZipFile(archive)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def _is_storage(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


def storage_plan(archive: Archive, state: Mapping[str, torch.Tensor]) -> Plan | None:
    """The plan of ``archive`` for ``state`` (the tensors it holds), or None (see the module)."""
    tensors: dict[str, tuple[int, str]] = {}
    for name, tensor in state.items():
        data = _tensor_bytes(tensor)
        tensors[name] = (len(data), hashlib.sha256(data).hexdigest())
    return plan_by_digest(archive, tensors)


def plan_by_digest(archive: Archive, tensors: Mapping[str, tuple[int, str]]) -> Plan | None:
    """:func:`storage_plan` from each tensor's byte size and SHA-256 (what the model sandbox reports
    when it checks an upload) instead of the tensors: the archive's storages are hashed here,
    each read piecewise (never a whole storage in memory: a 3 GB model's largest is ~3 GB)."""
    try:
        with _zip(archive) as zf:
            by_digest: dict[tuple[int, str], list[str]] = {}
            for info in zf.infolist():
                if _is_storage(info.filename) and info.file_size > 0:
                    hasher = hashlib.sha256()
                    with zf.open(info) as entry:
                        while chunk := entry.read(_COPY_CHUNK):
                            hasher.update(chunk)
                    by_digest.setdefault((info.file_size, hasher.hexdigest()), []).append(info.filename)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return None
    plan: Plan = {}
    for name, (size, digest) in tensors.items():
        if not size:
            continue
        entries = by_digest.get((size, digest), [])
        if len(entries) != 1:
            return None
        plan[name] = entries[0]
    if len(set(plan.values())) != len(plan):
        return None
    return plan


def fits(archive: Archive, plan: Plan, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``plan`` applies to ``archive`` and ``state``: every non-empty tensor planned, each
    entry present, stored uncompressed, and of the tensor's size."""
    try:
        with _zip(archive) as zf:
            sizes = {info.filename: (info.file_size, info.compress_type) for info in zf.infolist()}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return False
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            continue
        entry = plan.get(name)
        if entry is None or sizes.get(entry) != (nbytes, zipfile.ZIP_STORED):
            return False
    return True


class _Utf8Name(zipfile.ZipInfo):
    """An entry whose name is flagged UTF-8 as torch flags its own (``zipfile`` flags only non-ASCII
    names; a reader then decodes the rest as cp437, a codec the model sandbox cannot import).

    With ``known`` (CRC, stored size) its local header is final from the start: ``zipfile`` writes
    it with a zero CRC before the data and patches it after, and a blob hashed as it is written
    (:class:`flplatform.blobs.hashed_writes.HashedWrites`) stays valid only if the patch rewrites
    the same bytes."""

    known: tuple[int, int] | None = None

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:  # noqa: N802 - zipfile's own name
        return self.filename.encode("utf-8"), self.flag_bits | 0x800

    def FileHeader(self, zip64: bool | None = None) -> bytes:  # noqa: N802 - zipfile's own name
        if self.known is None:
            return super().FileHeader(zip64)
        seen = self.CRC, self.compress_size
        self.CRC, self.compress_size = self.known
        try:
            return super().FileHeader(zip64)
        finally:
            self.CRC, self.compress_size = seen


def write_replaced(archive: Archive, plan: Plan, state: Mapping[str, torch.Tensor], sink: IO[bytes]) -> None:
    """Writes ``archive`` with the planned storages written from ``state`` into ``sink`` (a
    seekable binary file; call :func:`fits` first): entry by entry, the tensors from their own
    memory and the other entries copied piecewise from the source, so no copy of the archive is
    ever whole in memory."""
    by_entry = {entry: name for name, entry in plan.items() if name in state}
    with _zip(archive) as source, zipfile.ZipFile(sink, "w") as target:
        for info in source.infolist():
            entry = _Utf8Name(info.filename, date_time=info.date_time)
            entry.external_attr = info.external_attr
            name = by_entry.get(info.filename)
            if name is None:
                # Stored (torch deflates its code entries, a few kB): a compressed size is known only
                # after compressing, and the header is final from the start (same bytes, same CRC).
                entry.compress_type = zipfile.ZIP_STORED
                entry.file_size = info.file_size
                entry.known = (info.CRC, info.file_size)
                with source.open(info) as data, target.open(entry, "w") as out:
                    shutil.copyfileobj(data, out, _COPY_CHUNK)
                continue
            tensor = _tensor_bytes(state[name])
            entry.compress_type = zipfile.ZIP_STORED
            entry.file_size = len(tensor)  # decides zip64 up front (models over 2 GiB)
            entry.known = (isal_zlib.crc32(tensor), len(tensor))
            with target.open(entry, "w") as out:
                out.write(tensor)


def replace_weights(archive: Archive, plan: Plan, state: Mapping[str, torch.Tensor]) -> memoryview:
    """:func:`write_replaced` into memory: a view of the new archive's buffer (no copy into
    ``bytes``). The round's close writes into the blob store instead (no buffer at all)."""
    out = io.BytesIO()
    write_replaced(archive, plan, state, out)
    return out.getbuffer().toreadonly()
