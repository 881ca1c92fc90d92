"""The framed pipe protocol between the server and its sandbox workers.

One frame = a 16-byte header (magic ``FLPS``, JSON length u32, blob total u64), a JSON object,
then the blobs back to back (their lengths are listed in the JSON under ``"_blobs"``). Blobs are
raw bytes: TorchScript archives going in, safetensors coming out, and for inference the tensors'
own bytes (dtype and shape in the JSON, see :func:`tensor_blob`). Nothing is ever pickled in
either direction: the worker runs untrusted code, so every answer it sends is parsed as data,
with size caps checked before anything is allocated.

Frames are read and written on raw descriptors (no buffered file objects): one ``writev`` sends
a whole frame without joining its parts, a small frame arrives with one ``read``, and each blob
is read straight into its own buffer (which a tensor can then wrap without another copy). The
same :class:`FrameReader` serves the worker (blocking descriptors) and the server (non-blocking
descriptors, read from the event loop or, for the synchronous calls, after ``select``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import select
import struct
from collections.abc import Sequence
from typing import Any

import torch

MAGIC = b"FLPS"
_HEADER = struct.Struct("<4sIQ")
MAX_JSON_BYTES = 16 * 1024**2
_FIRST_READ = 64 * 1024  # one read takes a whole small frame (the usual inference answer)
_IOV_MAX = 1024

Blob = bytes | bytearray | memoryview


class WorkerError(Exception):
    """An answer of kind ``error`` (raised in the worker, re-raised from the answer in the server)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class ProtocolError(Exception):
    """A malformed, oversized or truncated frame (the peer is broken or hostile, or gone)."""


# --------------------------------------------------------------------------- writing


def encode_frame(message: dict[str, Any], blobs: Sequence[Blob] = ()) -> list[Blob]:
    """The frame's parts, blobs not copied."""
    sizes = [memoryview(b).nbytes for b in blobs]
    body = dict(message)
    body["_blobs"] = sizes
    text = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_JSON_BYTES:
        raise ProtocolError(f"frame JSON of {len(text)} bytes exceeds {MAX_JSON_BYTES}")
    return [_HEADER.pack(MAGIC, len(text), sum(sizes)), text, *blobs]


def _write_some(fd: int, parts: list[memoryview]) -> list[memoryview]:
    """One ``writev``; the parts still to send (raises BlockingIOError on a full non-blocking pipe)."""
    written = os.writev(fd, parts[:_IOV_MAX])
    while parts and written >= parts[0].nbytes:
        written -= parts[0].nbytes
        parts = parts[1:]
    if written:
        parts = [parts[0][written:], *parts[1:]]
    return parts


def _views(parts: list[Blob]) -> list[memoryview]:
    views = [memoryview(p).cast("B") for p in parts]
    return [v for v in views if v.nbytes]


def write_frame_fd(fd: int, message: dict[str, Any], blobs: Sequence[Blob] = ()) -> None:
    """Send a frame; waits (``select``) when a non-blocking pipe is full."""
    parts = _views(encode_frame(message, blobs))
    while parts:
        try:
            parts = _write_some(fd, parts)
        except BlockingIOError:
            select.select([], [fd], [])


async def write_frame_async(fd: int, message: dict[str, Any], blobs: Sequence[Blob] = ()) -> None:
    """Send a frame on a non-blocking pipe from the event loop (usually one ``writev``, no wait)."""
    parts = _views(encode_frame(message, blobs))
    while parts:
        try:
            parts = _write_some(fd, parts)
        except BlockingIOError:
            await _ready(fd, writable=True)


async def _ready(fd: int, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


# --------------------------------------------------------------------------- reading


class FrameReader:
    """Reads one frame from a descriptor, a read at a time (:meth:`read_from`)."""

    def __init__(self, *, max_blob_bytes: int):
        self.max_blob_bytes = max_blob_bytes
        self._head = bytearray()
        self._message: dict[str, Any] | None = None
        self._blobs: list[bytearray] = []
        self._pending: list[memoryview] = []

    def read_from(self, fd: int) -> tuple[dict[str, Any], list[bytearray]] | None:
        """One read; the frame once complete, else None. Raises BlockingIOError when a
        non-blocking descriptor has nothing, :class:`ProtocolError` at end of stream or for a
        malformed or oversized frame."""
        if self._message is None:
            want = _FIRST_READ
            if len(self._head) >= _HEADER.size:
                want = max(want, _HEADER.size + _HEADER.unpack_from(self._head)[1] - len(self._head))
            chunk = os.read(fd, want)
            if not chunk:
                raise ProtocolError(f"stream closed after {len(self._head)} bytes of a frame")
            self._head += chunk
            if not self._parse_head():
                return None
        else:
            got = os.readv(fd, self._pending[:_IOV_MAX])
            if not got:
                raise ProtocolError("stream closed inside a frame's blobs")
            while got >= self._pending[0].nbytes:
                got -= self._pending.pop(0).nbytes
                if not self._pending:
                    break
            if got:
                self._pending[0] = self._pending[0][got:]
        if self._pending:
            return None
        assert self._message is not None
        frame = (self._message, self._blobs)
        self._message, self._blobs = None, []
        return frame

    def _parse_head(self) -> bool:
        """Header and JSON complete: parse them, allocate the blobs (sizes checked first) and
        move what was read past the JSON into them."""
        head = self._head
        if len(head) < _HEADER.size:
            return False
        magic, json_len, blob_total = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise ProtocolError("bad frame magic")
        if json_len > MAX_JSON_BYTES:
            raise ProtocolError(f"frame JSON of {json_len} bytes exceeds {MAX_JSON_BYTES}")
        if blob_total > self.max_blob_bytes:
            raise ProtocolError(f"frame blobs of {blob_total} bytes exceed {self.max_blob_bytes}")
        end = _HEADER.size + json_len
        if len(head) < end:
            return False
        if len(head) - end > blob_total:
            raise ProtocolError("bytes after the end of the frame")
        try:
            message = json.loads(bytes(head[_HEADER.size : end]))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ProtocolError(f"frame JSON does not parse ({exc})") from None
        if not isinstance(message, dict):
            raise ProtocolError("frame JSON is not an object")
        lengths = message.pop("_blobs", None)
        if (
            not isinstance(lengths, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths)
            or sum(lengths) != blob_total
        ):
            raise ProtocolError("frame blob lengths are inconsistent")
        blobs = [bytearray(n) for n in lengths]
        offset = end
        pending = []
        for blob in blobs:
            take = min(len(blob), len(head) - offset)
            if take:
                blob[:take] = head[offset : offset + take]
                offset += take
            if take < len(blob):
                pending.append(memoryview(blob)[take:])
        self._message, self._blobs, self._pending = message, blobs, pending
        self._head = bytearray()
        return True


def read_frame_fd(fd: int, *, max_blob_bytes: int) -> tuple[dict[str, Any], list[bytearray]]:
    """One frame from a blocking descriptor, or a non-blocking one (waits with ``select``)."""
    reader = FrameReader(max_blob_bytes=max_blob_bytes)
    while True:
        try:
            frame = reader.read_from(fd)
        except BlockingIOError:
            select.select([fd], [], [])
            continue
        if frame is not None:
            return frame


async def read_frame_async(fd: int, *, max_blob_bytes: int) -> tuple[dict[str, Any], list[bytearray]]:
    """One frame from a non-blocking descriptor, waiting on the event loop (no thread)."""
    reader = FrameReader(max_blob_bytes=max_blob_bytes)
    while True:
        try:
            frame = reader.read_from(fd)
        except BlockingIOError:
            await _ready(fd, writable=False)
            continue
        if frame is not None:
            return frame


# --------------------------------------------------------------------------- tensors as raw blobs

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
        torch.int16, torch.int32, torch.int64, torch.bool,
    )
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_ITEM_SIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _DTYPES.values()}
MAX_DIMS = 16


def tensor_blob(tensor: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """``({"dtype", "shape"}, bytes of the tensor)`` without copying a contiguous CPU tensor."""
    flat = tensor.detach().cpu().contiguous()
    name = _DTYPE_NAMES.get(flat.dtype)
    if name is None:
        raise ValueError(f"tensors of dtype {flat.dtype} cannot be sent to the sandbox")
    raw = flat.reshape(-1).view(torch.uint8).numpy()
    return {"dtype": name, "shape": list(flat.shape)}, raw.data.cast("B")


def tensor_from_blob(spec: Any, blob: bytearray) -> torch.Tensor:
    """The tensor ``spec`` (from :func:`tensor_blob`) describes, over ``blob``'s memory (no copy:
    the buffer is the reader's own, not shared with the peer). Raises :class:`ProtocolError`
    for an unknown dtype, a bad shape or a size that does not match."""
    if not isinstance(spec, dict):
        raise ProtocolError("tensor description is not an object")
    name, shape = spec.get("dtype"), spec.get("shape")
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"tensor dtype {spec.get('dtype')!r} is not accepted")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError("tensor shape is not a list of sizes")
    if math.prod(shape) * _ITEM_SIZES[dtype] != len(blob):
        raise ProtocolError(f"tensor of shape {shape} and dtype {name} is not {len(blob)} bytes")
    if not blob:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(blob, dtype=dtype).reshape(shape)
