"""Checking streamed model uploads (:mod:`flplatform.blobs.multipart`) without holding them.

* :class:`~flplatform.models.update_header.UpdateInspector` has seen a client update's first
  bytes while the rest was still on the wire (its safetensors header against the global model).
* :func:`store_update` then finishes on the spooled file: values of a safetensors update are
  checked as they streamed (:mod:`flplatform.models.stream_values`), or else through a memory map
  in a worker thread (finite floats, one window at a time, pages dropped after each window), and
  an update already in the canonical layout (what
  :func:`flplatform.aggregation.codec.encode_safetensors` writes) is published as received;
  any other accepted update is re-encoded into that layout straight from the map (or from the
  tensors the sandbox / ``torch.load(mmap=True, weights_only=True)`` returned) into a new writer.
* TorchScript files are checked by the sandbox from a memory map of the spooled file
  (:func:`check_torchscript_part`), never loaded here.

Nothing is published before every check passed: a refused upload leaves no blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import mmap
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import torch

from flplatform.aggregation import codec
from flplatform.aggregation.kernels import all_finite, fold_chunk
from flplatform.blobs import BlobInfo, BlobStore
from flplatform.blobs.multipart import FilePart
from flplatform.models import archive_weights
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
    require_torchscript,
    sandboxed,
    validate_state_dict,
)
from flplatform.models.update_header import ZIP_MAGIC, UpdateInspector, canonical_header

#: Values are checked (and pages dropped) this many bytes at a time. Each upload in flight keeps up
#: to a window of its spooled file mapped and resident: 16 MiB windows were ≈ 20 MB more of the
#: server's peak in the 8 × 68 MB round bench than 4 MiB ones, at no measured cost in upload
#: throughput or CPU (docs/performance.md, "Peak RSS").
CHECK_WINDOW = 4 * 1024**2
#: Re-encoded updates are handed to the writer in pieces of this size.
ENCODE_PIECE = 8 * 1024**2


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


def _release(view: memoryview) -> None:
    """Release a view of a map early; one still exported (a write cut short) goes with the GC."""
    with contextlib.suppress(BufferError):
        view.release()


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
            # A sum first (kernels.all_finite: one pass, no temporaries, run in threads that never
            # wait at an OpenMP barrier). torch.isfinite(...).all() per window cost the server
            # ≈ 0.35 s of CPU per 8 × 68 MB burst and ≈ 180 MB of peak RSS (docs/performance.md).
            if not all_finite(piece.view(dtype), fold_chunk(torch.float32)):
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
            _release(view)


async def _spooled_torchscript(part: FilePart) -> Path:
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
    return path


async def check_torchscript_part(part: FilePart, *, kind: str = "model") -> int:
    """Check a spooled upload in the sandbox (TorchScript only, as :func:`files.check_torchscript`);
    returns its parameter count. The sandbox reads the bytes from a memory map of the file."""
    from flplatform.sandbox import client

    path = await _spooled_torchscript(part)
    with mapped(path) as mm:
        view = memoryview(mm)
        try:
            return await sandboxed(client.check_module(view, kind=kind))  # type: ignore[arg-type]
        finally:
            _release(view)


#: An uploaded file: streamed into the store's spool (:mod:`flplatform.blobs.multipart`), or bytes.
UploadedFile = bytes | FilePart


async def check_module(file: UploadedFile, *, kind: str = "model") -> None:
    """A TorchScript upload checked in the sandbox (a streamed part from its spooled file)."""
    if isinstance(file, FilePart):
        await check_torchscript_part(file, kind=kind)
    else:
        await check_torchscript(file, kind=kind)


async def check_global_model(
    file: UploadedFile,
) -> tuple[dict[str, TensorSpec], archive_weights.Plan | None]:
    """:func:`check_module` for a global model, returning what the sandbox's check saw: the tensor
    layout (stored with the blob, :mod:`flplatform.models.layouts`) and the archive's storage plan
    (its storages hashed here, piecewise, against the tensors' digests; None when the tensors do
    not map one to one onto storages). Nothing has to decode the model again for either."""
    from flplatform.sandbox import client

    archive: bytes | Path
    if isinstance(file, FilePart):
        archive = await _spooled_torchscript(file)
        with mapped(archive) as mm:
            view = memoryview(mm)
            try:
                checked = await sandboxed(client.check_model(view))  # type: ignore[arg-type]
            finally:
                _release(view)
    else:
        require_torchscript(file)
        archive = file
        checked = await sandboxed(client.check_model(file))
    layout = {name: TensorSpec(shape, dtype) for name, (dtype, shape, _) in checked.tensors.items()}
    sizes = {
        name: (math.prod(shape) * torch.empty((), dtype=dtype).element_size(), digest)
        for name, (dtype, shape, digest) in checked.tensors.items()
    }
    plan = await asyncio.to_thread(archive_weights.plan_by_digest, archive, sizes)
    return layout, plan


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
            if inspector.values.nonfinite is not None:
                raise ModelFileError(
                    f"Tensor {inspector.values.nonfinite!r} contains NaN or infinite values."
                )
            if not inspector.values.complete:  # not watched while it streamed (small bodies)
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
                    _release(source)
        fmt = await asyncio.to_thread(detect_file_format, path)
        if fmt == TORCHSCRIPT:
            state = await torchscript_part_state(part)
        else:
            state = await asyncio.to_thread(_load_state_dict, path)
        await asyncio.to_thread(validate_state_dict, state, spec)
        return await _write_canonical(store, spec, _tensor_pieces(state, spec))
    finally:
        await part.writer.abort()  # a no-op once committed
