"""Streaming multipart uploads: a ``multipart/form-data`` body parsed as it arrives, each file part
written straight into a blob writer (hashed, spooled to the store's temporary directory, never
whole in memory), small text fields kept in memory under a cap.

python-multipart's push parser (the library Starlette's own form parsing uses) is fed from
``request.stream()``; its callbacks collect the parts' bytes, and after each network read the file
bytes go to their writer (one worker-thread hop per MiB, :class:`~flplatform.blobs.BlobWriter`)
and to the part's *inspector*, which may refuse the upload from its first bytes (a safetensors
header that does not fit the model) while the rest of the body is still on the wire.

The body's size limit is the request guard's (``flplatform.auth.request_guard``: 413 past
``FLP_MAX_UPLOAD_BYTES``, with or without ``Content-Length``). Whatever ends the parse early — a
refused part, a 413, a client that disconnects, a cancelled task — aborts every writer: no blob
is left behind. After :func:`stream_form` returns, the caller owns the form's writers: ``async
with form:`` aborts those it did not commit.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from flplatform.blobs.base import BlobInfo, BlobStore, BlobWriter
from flplatform.errors import BadRequest, PayloadTooLarge

#: A text field may hold at most this many bytes (rounds, sample sizes, metrics, names…).
MAX_FIELD_BYTES = 1024 * 1024
MAX_FIELDS = 1000
MAX_FILES = 8


class PartInspector(Protocol):
    """Looks at a file part's bytes as they arrive; raises an ``AppError`` to refuse the upload.
    ``observe`` sees them again in the blob writer's thread (:meth:`BlobWriter.observe`)."""

    async def feed(self, chunk: memoryview) -> None: ...

    async def end(self) -> None: ...

    def observe(self, offset: int, chunk: memoryview) -> None: ...


InspectorFactory = Callable[[], PartInspector]


@dataclass
class FilePart:
    """One uploaded file: its bytes are in ``writer`` (not yet published)."""

    name: str
    filename: str
    content_type: str
    writer: BlobWriter
    inspector: PartInspector | None = None

    @property
    def size(self) -> int:
        return self.writer.size

    async def spooled(self) -> Path:
        """The local temporary file holding every byte (see :meth:`BlobWriter.seal`)."""
        return await self.writer.seal()

    async def commit(self) -> BlobInfo:
        """Publish the bytes as a blob (after the caller's checks)."""
        return await self.writer.commit()

    async def read(self) -> bytes:
        """The whole part in memory: only for parts that are small by construction."""
        path = await self.spooled()
        return await asyncio.to_thread(path.read_bytes)


@dataclass
class StreamedForm:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, list[FilePart]] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.fields or name in self.files

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default

    def getlist(self, name: str) -> list[str]:
        return list(self.fields.get(name, ()))

    def file(self, name: str) -> FilePart | None:
        parts = self.files.get(name)
        return parts[-1] if parts else None

    async def aclose(self) -> None:
        """Abort every writer not committed (idempotent)."""
        for parts in self.files.values():
            for part in parts:
                await part.writer.abort()

    async def __aenter__(self) -> StreamedForm:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _decode(data: bytes | bytearray, charset: str) -> str:
    try:
        return bytes(data).decode(charset)
    except (UnicodeDecodeError, LookupError):
        return bytes(data).decode("latin-1")


class _Collector:
    """python-multipart's callbacks (synchronous): they only record; the async loop writes."""

    def __init__(self, charset: str, max_field_bytes: int) -> None:
        self.charset = charset
        self.max_field_bytes = max_field_bytes
        self.header_name = b""
        self.header_value = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.field_data = bytearray()
        self.field_name: str | None = None
        self.current: FilePart | None = None
        self.is_file = False
        # What happened during one parser.write: (part, bytes) to write, parts that ended, fields.
        self.pending: list[tuple[str, Any]] = []
        self.fields = 0
        self.files = 0

    def on_part_begin(self) -> None:
        self.headers = []
        self.field_data = bytearray()
        self.field_name = None
        self.is_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers.append((self.header_name.lower(), self.header_value))
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        headers = dict(self.headers)
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise BadRequest(
                'The Content-Disposition header field "name" must be provided.', code="invalid_multipart"
            )
        self.field_name = _decode(options[b"name"], self.charset)
        self.is_file = b"filename" in options
        if self.is_file:
            self.files += 1
            if self.files > MAX_FILES:
                raise BadRequest(f"Too many files (at most {MAX_FILES}).", code="invalid_multipart")
            filename = _decode(options[b"filename"], self.charset)
            content_type = _decode(headers.get(b"content-type", b""), "latin-1")
            self.pending.append(("file", (self.field_name, filename, content_type)))
        else:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise BadRequest(f"Too many fields (at most {MAX_FIELDS}).", code="invalid_multipart")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.is_file:
            # The parser hands out slices of the network chunk (bytes: a read-only view, no copy)
            # or of its own look-behind buffer (reused: copied).
            piece = memoryview(data)[start:end] if isinstance(data, bytes) else bytes(data[start:end])
            self.pending.append(("data", piece))
            return
        if len(self.field_data) + end - start > self.max_field_bytes:
            raise PayloadTooLarge(
                f"Form field {self.field_name!r} is larger than {self.max_field_bytes} bytes.",
                code="field_too_large",
            )
        self.field_data += data[start:end]

    def on_part_end(self) -> None:
        if self.is_file:
            self.pending.append(("end", None))
        else:
            assert self.field_name is not None
            self.pending.append(("field", (self.field_name, _decode(self.field_data, self.charset))))


async def stream_form(
    request: Request,
    store: BlobStore,
    *,
    inspectors: Mapping[str, InspectorFactory] | None = None,
    max_field_bytes: int = MAX_FIELD_BYTES,
) -> StreamedForm:
    """Parse the request's multipart body, streaming every file part into a writer of ``store``.

    ``inspectors`` maps file field names to a factory of the inspector that sees that part's bytes.
    A body that is not ``multipart/form-data`` is read by Starlette (urlencoded forms: small, under
    the JSON body limit) and has no files. On any error every writer is aborted.
    """
    content_type = request.headers.get("content-type", "")
    media_type, params = parse_options_header(content_type)
    form = StreamedForm()
    if media_type != b"multipart/form-data":
        async with request.form(max_files=0) as parsed:
            for key, value in parsed.multi_items():
                if isinstance(value, str):
                    form.fields.setdefault(key, []).append(value)
        return form
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("Missing boundary in multipart.", code="invalid_multipart")
    charset = _decode(params.get(b"charset", b"utf-8"), "latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    collector = _Collector(charset, max_field_bytes)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": collector.on_part_begin,
            "on_part_data": collector.on_part_data,
            "on_part_end": collector.on_part_end,
            "on_header_field": collector.on_header_field,
            "on_header_value": collector.on_header_value,
            "on_header_end": collector.on_header_end,
            "on_headers_finished": collector.on_headers_finished,
        },
    )
    factories = inspectors or {}
    current: FilePart | None = None
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            try:
                parser.write(chunk)
            except FormParserError:
                raise BadRequest("Invalid multipart data.", code="invalid_multipart") from None
            events, collector.pending = collector.pending, []
            for kind, event in events:
                if kind == "file":
                    name, filename, part_type = event
                    factory = factories.get(name)
                    current = FilePart(
                        name, filename, part_type, store.writer(), factory() if factory else None
                    )
                    if current.inspector is not None:
                        current.writer.observe(current.inspector.observe)
                    form.files.setdefault(name, []).append(current)
                elif kind == "data":
                    assert current is not None
                    piece: memoryview | bytes = event
                    if current.inspector is not None:
                        await current.inspector.feed(memoryview(piece))
                    await current.writer.write(piece)
                elif kind == "end":
                    assert current is not None
                    if current.inspector is not None:
                        await current.inspector.end()
                    await current.writer.seal()
                    current = None
                else:
                    key, text = event
                    form.fields.setdefault(key, []).append(text)
        try:
            parser.finalize()
        except FormParserError:
            raise BadRequest("Invalid multipart data.", code="invalid_multipart") from None
        if current is not None:
            raise BadRequest("Invalid multipart data: the body ends inside a part.", code="invalid_multipart")
    except ClientDisconnect:
        await form.aclose()
        # Nobody reads the answer; an error of its own (not a logged 500) ends the request.
        raise BadRequest(
            "The client disconnected before the body was complete.", code="client_disconnected"
        ) from None
    except BaseException:
        await form.aclose()
        raise
    return form
