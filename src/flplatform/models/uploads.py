"""Checking streamed model uploads (:mod:`flplatform.blobs.multipart`) without holding them.

* :class:`UpdateInspector` sees a client update's first bytes while the rest is still on the wire:
  a safetensors update is refused as soon as its 8-byte header length or its JSON header arrive if
  they do not fit the global model (names, dtypes, shapes, offsets against the declared size);
  zip archives (TorchScript, ``torch.save``) and anything else are told apart from the first bytes.
* :func:`store_update` then finishes on the spooled file: values of a safetensors update are
  checked through a memory map in a worker thread (finite floats, one window at a time, pages
  dropped after each window), and an update already in the canonical layout (what
  :func:`flplatform.aggregation.codec.encode_safetensors` writes) is published as received;
  any other accepted update is re-encoded into that layout straight from the map (or from the
  tensors the sandbox / ``torch.load(mmap=True, weights_only=True)`` returned) into a new writer.
* TorchScript files are checked by the sandbox from a memory map of the spooled file
  (:func:`check_torchscript_part`), never loaded here.

Nothing is published before every check passed: a refused upload leaves no blob.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import pickle
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import torch

from flplatform.aggregation import codec
from flplatform.blobs import BlobInfo, BlobStore
from flplatform.blobs.multipart import FilePart
from flplatform.errors import BadRequest
from flplatform.models.archive_limits import ArchiveTooLarge, check_archive_limits
from flplatform.models.files import (
    ACCEPTED_MODEL_FORMATS,
    ACCEPTED_UPDATE_FORMATS,
    SAFETENSORS,
    TORCH_STATE_DICT,
    TORCHSCRIPT,
    ModelFileError,
    StateDict,
    TensorSpec,
    check_torchscript,
    sandboxed,
    validate_state_dict,
)

#: Values are checked (and pages dropped) this many bytes at a time.
CHECK_WINDOW = 16 * 1024**2
#: Bodies declared (Content-Length) at most this large are checked once they have arrived; larger
#: ones, and chunked ones, against the layout read before the body (refused from the first bytes).
EARLY_CHECK_BYTES = 16 * 1024**2
#: Re-encoded updates are handed to the writer in pieces of this size.
ENCODE_PIECE = 8 * 1024**2
ZIP_MAGIC = b"PK\x03\x04"


def canonical_header(spec: Mapping[str, TensorSpec]) -> bytes:
    """The first bytes (length + JSON header + padding) of the canonical safetensors encoding of
    any state dict with this layout: the bytes ``codec.encode_safetensors`` writes."""
    names = codec.safetensors_order(cast(Mapping[str, torch.Tensor], spec))
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        item = spec[name]
        nbytes = codec.ITEMSIZE[item.dtype]
        for d in item.shape:
            nbytes *= d
        header[name] = {
            "dtype": codec.TORCH_TO_SAFETENSORS[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)
    return struct.pack("<Q", len(head)) + head


class UpdateInspector:
    """Checks a client update's first bytes against the global model's layout ``spec``: while
    they arrive when the layout is known before the body (large uploads), else once it is
    bound (:meth:`bind`, small bodies: reading the layout first would cost more than the check)."""

    def __init__(self, spec: Mapping[str, TensorSpec] | None) -> None:
        self.spec = spec
        self.head = bytearray()
        self.format: str | None = None  # SAFETENSORS, or "archive" (decided from the zip)
        self.header_len = 0
        self.data_start = 0
        self.data_len = 0
        self.ranges: dict[str, tuple[int, int]] = {}  # name -> [begin, end) in the data region
        self.canonical = False
        self.size = 0
        self.complete = False  # the header has arrived (or the file is no safetensors)
        self.checked = False  # ... and has been checked against the layout
        self.ended = False
        self.error: ModelFileError | None = None

    async def feed(self, chunk: memoryview) -> None:
        self.size += len(chunk)
        if self.error is None:
            try:
                await self._feed(chunk)
            except ModelFileError as exc:
                self._refuse(exc)

    async def end(self) -> None:
        self.ended = True
        if self.error is None:
            try:
                self._end()
            except ModelFileError as exc:
                self._refuse(exc)

    def _refuse(self, exc: ModelFileError) -> None:
        """Refuse at once when the layout is known; else when it is bound: the round rules
        (who may upload, and when) answer before the file's problems, as for small bodies."""
        if self.spec is not None:
            raise exc
        self.error = exc

    async def _feed(self, chunk: memoryview) -> None:
        used = 0
        while not self.complete:
            need = 9 if self.format is None else self.data_start
            take = max(0, need - len(self.head))
            self.head += chunk[used : used + take]
            used += take
            if len(self.head) < need:
                return
            if self.format is None:
                self._sniff()
                continue
            self.complete = True
            if self.spec is not None:
                if self.header_len > 1024**2:
                    await asyncio.to_thread(self._check_header)
                else:
                    self._check_header()

    def _end(self) -> None:
        if self.format is None:
            if len(self.head) >= 8 and bytes(self.head[:4]) != ZIP_MAGIC:
                self._sniff()
            else:
                raise ModelFileError("The file is empty or truncated. " + ACCEPTED_UPDATE_FORMATS)
        if self.format == SAFETENSORS:
            if not self.complete:
                raise ModelFileError(
                    f"Corrupt safetensors file: truncated (header says {self.header_len} header bytes, "
                    f"only {self.size - 8} follow)"
                )
            self._check_size()

    def bind(self, spec: Mapping[str, TensorSpec]) -> None:
        """Check against ``spec`` what arrived before the layout was known (blocking: a thread
        for headers over 1 MiB is not worth it here, they are checked while streaming)."""
        if self.error is not None:
            raise self.error
        if self.spec is None:
            self.spec = spec
            if self.format == SAFETENSORS and self.complete:
                self._check_header()
                if self.ended:
                    self._check_size()

    def _check_size(self) -> None:
        if not self.checked:
            return
        expected = self.data_start + self.data_len
        if self.size != expected:
            raise ModelFileError(
                f"Corrupt safetensors file: the header declares {expected} bytes in all, the file has "
                f"{self.size}" + (" (truncated)." if self.size < expected else " (trailing bytes).")
            )

    def _sniff(self) -> None:
        head = bytes(self.head)
        if head[:4] == ZIP_MAGIC:
            self.format, self.complete, self.checked = "archive", True, True
            return
        (header_len,) = struct.unpack_from("<Q", head, 0)
        if 0 < header_len <= codec.MAX_HEADER_BYTES and head[8:9] == b"{":
            self.format, self.header_len, self.data_start = SAFETENSORS, header_len, 8 + header_len
            return
        if head[:1] == b"\x80" or head[:2] == b"\x8a\x0a":
            raise ModelFileError("Plain pickles are never loaded. " + ACCEPTED_UPDATE_FORMATS)
        if header_len > codec.MAX_HEADER_BYTES and head[8:9] == b"{":
            raise ModelFileError(
                f"Corrupt safetensors file: header length {header_len} is out of range "
                f"(at most {codec.MAX_HEADER_BYTES})."
            )
        raise ModelFileError("Unrecognised file format. " + ACCEPTED_UPDATE_FORMATS)

    def _check_header(self) -> None:
        assert self.spec is not None
        raw = bytes(self.head[: self.data_start])
        try:
            header = codec.read_safetensors_header(raw)[0]
        except codec.DecodeError as exc:
            raise ModelFileError(f"Corrupt safetensors file: {exc}") from None
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise ModelFileError("Corrupt safetensors file: __metadata__ must map strings to strings.")
        missing = sorted(set(self.spec) - set(header))
        extra = sorted(set(header) - set(self.spec))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing tensors {missing[:5]}")
            if extra:
                parts.append(f"unexpected tensors {extra[:5]}")
            raise ModelFileError("The update does not match the global model: " + ", ".join(parts) + ".")
        for name, item in self.spec.items():
            self.ranges[name] = self._entry(name, header[name], item)
        ordered = sorted(self.ranges.items(), key=lambda kv: kv[1])
        position = 0
        for name, (begin, end) in ordered:
            if begin != position:
                raise ModelFileError(
                    f"Corrupt safetensors file: tensor {name!r} starts at {begin}, expected {position} "
                    "(tensors must be stored back to back, without gaps or overlaps)."
                )
            position = end
        self.data_len = position
        self.canonical = raw == canonical_header(self.spec)
        self.checked = True

    @staticmethod
    def _entry(name: str, info: object, item: TensorSpec) -> tuple[int, int]:
        if not isinstance(info, dict):
            raise ModelFileError(f"Corrupt safetensors file: entry {name!r} is not an object.")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = codec.SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise ModelFileError(f"Corrupt safetensors file: tensor {name!r} has unsupported dtype {code!r}.")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise ModelFileError(f"Corrupt safetensors file: tensor {name!r} has an invalid shape {shape!r}.")
        if tuple(shape) != item.shape:
            raise ModelFileError(
                f"Tensor {name!r} has shape {shape}, the global model has {list(item.shape)}."
            )
        if dtype != item.dtype:
            raise ModelFileError(f"Tensor {name!r} has dtype {dtype}, the global model has {item.dtype}.")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            raise ModelFileError(
                f"Corrupt safetensors file: tensor {name!r} has invalid data_offsets {offsets!r}."
            )
        begin, end = offsets
        nbytes = codec.ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        if end - begin != nbytes:
            raise ModelFileError(
                f"Corrupt safetensors file: tensor {name!r} of shape {shape} and dtype {code} needs "
                f"{nbytes} bytes, its offsets span {end - begin}."
            )
        return begin, end


def small_body(headers: Mapping[str, str]) -> bool:
    """Whether the request declares a body of at most :data:`EARLY_CHECK_BYTES`."""
    length = headers.get("content-length", "").strip()
    return length.isdigit() and int(length) <= EARLY_CHECK_BYTES


class GuardedInspector:
    """An inspector whose refusals are the upload's 400 (``invalid_model_file``), raised while
    the body is still arriving."""

    def __init__(self, inner: UpdateInspector) -> None:
        self.inner = inner

    async def feed(self, chunk: memoryview) -> None:
        try:
            await self.inner.feed(chunk)
        except ModelFileError as exc:
            raise BadRequest(str(exc), code="invalid_model_file") from None

    async def end(self) -> None:
        try:
            await self.inner.end()
        except ModelFileError as exc:
            raise BadRequest(str(exc), code="invalid_model_file") from None


# --------------------------------------------------------------------------- spooled files


@contextmanager
def mapped(path: Path) -> Iterator[mmap.mmap]:
    """A read-only memory map of a spooled or stored file (an empty file cannot be mapped)."""
    with open(path, "rb") as file:
        mm = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mm
    finally:
        try:
            mm.close()
        except BufferError:  # a view still alive (an exception's frame): unmapped when it goes
            pass


def _drop_pages(mm: mmap.mmap, start: int, end: int) -> None:
    """Let the kernel take back the map's pages in ``[start, end)`` (they stay in the page cache)."""
    page = mmap.PAGESIZE
    first = start - start % page
    if end > first and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, first, end - first)


def check_finite(path: Path, inspector: UpdateInspector) -> None:
    """Every float tensor of a checked safetensors update is finite (read through a memory map,
    one window at a time; call in a worker thread)."""
    assert inspector.spec is not None and inspector.checked
    floats = {name: item.dtype for name, item in inspector.spec.items() if item.dtype.is_floating_point}
    if not floats or inspector.data_len == 0:
        return
    with mapped(path) as mm:
        _check_finite_map(mm, inspector, floats)


def _check_finite_map(mm: mmap.mmap, inspector: UpdateInspector, floats: dict[str, torch.dtype]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: never written
        raw = torch.frombuffer(mm, dtype=torch.uint8)
    for name, dtype in floats.items():
        itemsize = codec.ITEMSIZE[dtype]
        begin, end = inspector.ranges[name]
        window = CHECK_WINDOW - CHECK_WINDOW % itemsize
        for lo in range(inspector.data_start + begin, inspector.data_start + end, window):
            hi = min(lo + window, inspector.data_start + end)
            piece = raw[lo:hi]
            if piece.data_ptr() % itemsize:
                piece = piece.clone()
            if not bool(torch.isfinite(piece.view(dtype)).all()):
                raise ModelFileError(f"Tensor {name!r} contains NaN or infinite values.")
            _drop_pages(mm, lo, hi)


def detect_file_format(path: Path) -> str:
    """:func:`flplatform.models.files.detect_format` for a zip archive spooled to ``path`` (read
    from the file: the central directory is at its end)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            check_archive_limits(archive, size)
            names = archive.namelist()
    except ArchiveTooLarge as exc:
        raise ModelFileError(str(exc)) from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ModelFileError(
            f"The file is a corrupt or truncated archive ({exc}). " + ACCEPTED_UPDATE_FORMATS
        ) from None
    if any("/code/" in n or n.startswith("code/") for n in names):
        return TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return TORCH_STATE_DICT
    raise ModelFileError("Unrecognised archive. " + ACCEPTED_UPDATE_FORMATS)


def _load_state_dict(path: Path) -> StateDict:
    """A weights-only ``torch.save`` state dict, memory-mapped (never unpickles objects)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelFileError(
            f"The file needs unpickling arbitrary objects, which is refused ({first}). "
            + ACCEPTED_UPDATE_FORMATS
        ) from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelFileError(f"Could not read the file: {first}. " + ACCEPTED_UPDATE_FORMATS) from None
    if isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return dict(obj)
    raise ModelFileError(
        "torch.save files must contain a state dict (str → Tensor). " + ACCEPTED_UPDATE_FORMATS
    )


async def torchscript_part_state(part: FilePart) -> StateDict:
    """The weights of a spooled TorchScript archive, extracted by the sandbox from a map of the file."""
    from flplatform.sandbox import client

    path = await part.spooled()
    with mapped(path) as mm:
        view = memoryview(mm)
        try:
            return (await sandboxed(client.extract(view))).state  # type: ignore[arg-type]
        finally:
            view.release()


async def check_torchscript_part(part: FilePart, *, kind: str = "model") -> int:
    """Check a spooled upload in the sandbox (TorchScript only, as :func:`files.check_torchscript`);
    returns its parameter count. The sandbox reads the bytes from a memory map of the file."""
    from flplatform.sandbox import client

    path = await part.spooled()
    if part.size < 8:
        raise ModelFileError("The file is empty or truncated. " + ACCEPTED_MODEL_FORMATS)
    with open(path, "rb") as file:
        magic = file.read(4)
    fmt = await asyncio.to_thread(detect_file_format, path) if magic == ZIP_MAGIC else "other"
    if fmt != TORCHSCRIPT:
        raise ModelFileError(
            f"Expected a TorchScript archive, got {fmt if fmt != 'other' else 'another format'}. "
            + ACCEPTED_MODEL_FORMATS
        )
    with mapped(path) as mm:
        view = memoryview(mm)
        try:
            return await sandboxed(client.check_module(view, kind=kind))  # type: ignore[arg-type]
        finally:
            view.release()


#: An uploaded file: streamed into the store's spool (:mod:`flplatform.blobs.multipart`), or bytes.
UploadedFile = bytes | FilePart


async def check_module(file: UploadedFile, *, kind: str = "model") -> None:
    """A TorchScript upload checked in the sandbox (a streamed part from its spooled file)."""
    if isinstance(file, FilePart):
        await check_torchscript_part(file, kind=kind)
    else:
        await check_torchscript(file, kind=kind)


def uploaded_size(file: UploadedFile | None) -> int:
    if file is None:
        return 0
    return file.size if isinstance(file, FilePart) else len(file)


# --------------------------------------------------------------------------- storing an update


def _tensor_pieces(state: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec]) -> Iterator[memoryview]:
    names = codec.safetensors_order(cast(Mapping[str, torch.Tensor], spec))
    for name in names:
        flat = state[name].detach().contiguous().reshape(-1).view(torch.uint8)
        if flat.numel():
            view = memoryview(flat.numpy()).toreadonly()  # type: ignore[arg-type]
            for start in range(0, len(view), ENCODE_PIECE):
                yield view[start : start + ENCODE_PIECE]


async def _write_canonical(
    store: BlobStore, spec: Mapping[str, TensorSpec], pieces: Iterator[memoryview | bytes]
) -> BlobInfo:
    async with store.writer() as writer:
        await writer.write(canonical_header(spec))
        for piece in pieces:
            await writer.write(piece)
        return await writer.commit()


async def store_update(
    store: BlobStore, part: FilePart, inspector: UpdateInspector, spec: Mapping[str, TensorSpec]
) -> BlobInfo:
    """Finish checking a streamed client update and publish it in the canonical safetensors layout
    (as received when it already is); raises :class:`ModelFileError`. The part's own writer is
    committed or aborted here."""
    path = await part.spooled()
    try:
        inspector.bind(spec)
        if inspector.format == SAFETENSORS:
            await asyncio.to_thread(check_finite, path, inspector)
            if inspector.canonical:
                return await part.commit()
            with mapped(path) as mm:
                source = memoryview(mm)
                order = codec.safetensors_order(cast(Mapping[str, torch.Tensor], spec))

                def pieces() -> Iterator[memoryview]:
                    for name in order:
                        begin, end = inspector.ranges[name]
                        lo, hi = inspector.data_start + begin, inspector.data_start + end
                        for start in range(lo, hi, ENCODE_PIECE):
                            yield source[start : min(start + ENCODE_PIECE, hi)]

                try:
                    return await _write_canonical(store, spec, pieces())
                finally:
                    source.release()
        fmt = await asyncio.to_thread(detect_file_format, path)
        if fmt == TORCHSCRIPT:
            state = await torchscript_part_state(part)
        else:
            state = await asyncio.to_thread(_load_state_dict, path)
        await asyncio.to_thread(validate_state_dict, state, spec)
        return await _write_canonical(store, spec, _tensor_pieces(state, spec))
    finally:
        await part.writer.abort()  # a no-op once committed
