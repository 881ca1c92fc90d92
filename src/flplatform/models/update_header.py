"""The first bytes of a streamed client update, checked while the rest is still on the wire
(:mod:`flplatform.models.uploads` finishes the checks on the spooled file).

:class:`UpdateInspector` tells safetensors from zip archives (TorchScript, ``torch.save``) and
anything else from the first bytes, refuses an impossible safetensors header length from the
first 8, and checks the JSON header against the global model's layout (names, dtypes, shapes,
``data_offsets`` back to back, the declared total size) as soon as it is complete; it also
tells whether the header is the canonical one (:func:`canonical_header`), so that the update can
be stored as received.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Mapping
from typing import cast

import torch

from flplatform.aggregation import codec
from flplatform.errors import BadRequest
from flplatform.models.files import ACCEPTED_UPDATE_FORMATS, SAFETENSORS, ModelFileError, TensorSpec
from flplatform.models.stream_values import ValuesWatch

#: Bodies declared (Content-Length) at most this large are checked once they have arrived; larger
#: ones, and chunked ones, against the layout read before the body (refused from the first bytes).
EARLY_CHECK_BYTES = 16 * 1024**2
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
        # the float values, checked in the blob writer's thread as they pass (stream_values)
        self.values = ValuesWatch()

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
                # before this chunk (holding the header's end) goes to the writer
                self.values.set(
                    self.data_start, self.ranges, {n: item.dtype for n, item in self.spec.items()}
                )

    def observe(self, offset: int, chunk: memoryview) -> None:
        """The blob writer's observer (:meth:`flplatform.blobs.BlobWriter.observe`)."""
        self.values(offset, chunk)

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

    def observe(self, offset: int, chunk: memoryview) -> None:
        self.inner.observe(offset, chunk)
