"""The framed pipe protocol between the server and its sandbox workers.

One frame = a 16-byte header (magic ``FLPS``, JSON length u32, blob total u64), a JSON object,
then the blobs back to back (their lengths are listed in the JSON under ``"_blobs"``). Blobs are
raw bytes: TorchScript archives going in, safetensors coming out. Nothing is ever pickled in
either direction: the worker runs untrusted code, so every answer it sends is parsed as data,
with size caps checked before anything is allocated.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

MAGIC = b"FLPS"
_HEADER = struct.Struct("<4sIQ")
MAX_JSON_BYTES = 16 * 1024**2


class WorkerError(Exception):
    """An answer of kind ``error`` (raised in the worker, re-raised from the answer in the server)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class ProtocolError(Exception):
    """A malformed, oversized or truncated frame (the peer is broken or hostile, or gone)."""


def encode_frame(
    message: dict[str, Any], blobs: list[bytes] | tuple[bytes, ...] = ()
) -> list[bytes | memoryview]:
    body = dict(message)
    body["_blobs"] = [len(b) for b in blobs]
    text = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > MAX_JSON_BYTES:
        raise ProtocolError(f"frame JSON of {len(text)} bytes exceeds {MAX_JSON_BYTES}")
    return [_HEADER.pack(MAGIC, len(text), sum(len(b) for b in blobs)), text, *blobs]


def write_frame(
    stream: BinaryIO, message: dict[str, Any], blobs: list[bytes] | tuple[bytes, ...] = ()
) -> None:
    stream.writelines(encode_frame(message, blobs))
    stream.flush()


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise ProtocolError(f"stream closed after {got} of {size} bytes")
        got += n
    return bytes(buffer)


def read_frame(stream: BinaryIO, *, max_blob_bytes: int) -> tuple[dict[str, Any], list[bytes]]:
    """One frame; raises :class:`ProtocolError` for anything malformed or over ``max_blob_bytes``."""
    header = _read_exactly(stream, _HEADER.size)
    magic, json_len, blob_total = _HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError("bad frame magic")
    if json_len > MAX_JSON_BYTES:
        raise ProtocolError(f"frame JSON of {json_len} bytes exceeds {MAX_JSON_BYTES}")
    if blob_total > max_blob_bytes:
        raise ProtocolError(f"frame blobs of {blob_total} bytes exceed {max_blob_bytes}")
    try:
        message = json.loads(_read_exactly(stream, json_len))
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
    blobs = [_read_exactly(stream, n) for n in lengths]
    return message, blobs
