"""Streaming uploads (issue 21 item 2): the multipart body goes to the blob store's spool as it
arrives, checked from its first bytes; past the size limit (also without ``Content-Length``), on a
bad safetensors header or when the client disconnects mid-body nothing is left behind: no blob,
no temporary file, no row, no event. A large update streams through without the server ever
holding it (tracemalloc's peak of Python allocations stays small).

The requests are driven through the ASGI app with a ``receive()`` of our own, so the test decides
when the body ends, when the client disconnects, and sees how much of the body the server read
before it answered.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select

from flplatform.aggregation import codec
from flplatform.models import uploads
from flplatform.models.files import spec_of
from flplatform.models.update_header import canonical_header
from flplatform.orm import LocalModel
from flplatform.orm.training_event import TrainingEvent
from flplatform.settings import Settings
from flplatform.trainings import aggregate, events
from tests.training.conftest import (
    as_safetensors,
    create_training,
    scripted_bytes,
    shifted,
    state_of,
    tiny_net,
)

BOUNDARY = "flp-test-boundary-7f3a"
MiB = 1024**2


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
def settings(db_url: str, blob_dir: Path) -> Settings:
    return Settings(database_url=db_url, blob_dir=blob_dir, training_sweep_interval_seconds=0.05)


def _blob_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _multipart(
    fields: dict[str, str], file_chunks: Iterator[bytes], field: str = "model_file"
) -> Iterator[bytes]:
    for key, value in fields.items():
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="u.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield from file_chunks
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


async def _drive(
    app: Any, path: str, token: str, chunks: Iterator[bytes], *, disconnect: bool = False
) -> tuple[int | None, dict[str, Any] | None, int, bool]:
    """POST ``chunks`` as a chunked body (no Content-Length) straight into the ASGI app. Returns
    the status, the JSON answer, how many chunks the server had read, and whether it read them all."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Token {token}".encode()),
            (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    read = 0
    finished = False
    source = iter(chunks)
    pending = next(source, None)
    status: int | None = None
    body = bytearray()

    async def receive() -> dict[str, Any]:
        nonlocal read, finished, pending
        if pending is None:
            finished = True
            if disconnect:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk, pending = pending, next(source, None)
        read += 1
        more = pending is not None or disconnect
        if not more:
            finished = True
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    answer = json.loads(body) if body else None
    return status, answer, read, finished


async def _started(
    client: Any, alice: Any, make_user: Any, module: torch.nn.Module | None = None
) -> tuple[Any, str, bytes]:
    participant = await make_user("streamer", client=True)
    other = await make_user("other", client=True)
    initial = scripted_bytes(module if module is not None else tiny_net())
    r = await client.post(
        "/api/models/",
        headers=alice.headers,
        data={"name": "tiny", "description": "a tiny net"},
        files={"model_file": ("m.pt", initial)},
    )
    assert r.status_code == 201, r.text
    model_id = r.json()["model_id"]
    training_id = await create_training(client, alice.headers, model_id, [participant.id, other.id])
    r = await client.post(f"/api/trainings/{training_id}/start/", headers=alice.headers)
    assert r.status_code == 202, r.text
    return participant, model_id, initial


async def _nothing_stored(session: Any, blob_dir: Path, before: set[str]) -> None:
    assert _blob_files(blob_dir) == before  # no new blob, no temporary file left in tmp/
    assert (await session.execute(select(func.count()).select_from(LocalModel))).scalar_one() == 0
    kinds = (await session.execute(select(TrainingEvent.kind))).scalars().all()
    assert events.UPDATE_RECEIVED not in kinds


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_chunked_upload_over_the_limit_is_413_and_leaves_nothing(
    app, client, session, alice, make_user, blob_dir
):
    participant, model_id, initial = await _started(client, alice, make_user)
    state = state_of(initial)
    header = canonical_header(spec_of(state))
    app.state.settings.max_upload_bytes = 2 * MiB
    before = _blob_files(blob_dir)
    # A valid header, then more bytes than the limit allows: no Content-Length, the count decides.
    file_chunks = iter([header, *([b"\0" * (256 * 1024)] * 16)])
    status, answer, _read, finished = await _drive(
        app,
        f"/api/models/{model_id}/",
        participant.token,
        _multipart({"round": "0", "sample_size": "5"}, file_chunks),
    )
    assert status == 413, answer
    assert answer is not None and answer["code"] == "payload_too_large"
    assert not finished
    await _nothing_stored(session, blob_dir, before)


async def test_client_disconnecting_mid_body_leaves_no_blob_and_no_row(
    app, client, session, alice, make_user, blob_dir
):
    participant, model_id, initial = await _started(client, alice, make_user)
    good = as_safetensors(shifted(state_of(initial), 0.5))
    before = _blob_files(blob_dir)
    # Most of the update, then the client goes away.
    head = list(_multipart({"round": "0", "sample_size": "5"}, _pieces(good[: len(good) - 10], 64)))[:-1]
    status, _answer, _read, finished = await _drive(
        app, f"/api/models/{model_id}/", participant.token, iter(head), disconnect=True
    )
    assert finished
    assert status != 201
    await _nothing_stored(session, blob_dir, before)
    # The same client then uploads completely: accepted.
    status, answer, _read, _finished = await _drive(
        app,
        f"/api/models/{model_id}/",
        participant.token,
        _multipart({"round": "0", "sample_size": "5"}, iter([good])),
    )
    assert status == 201, answer


async def test_bad_safetensors_header_is_refused_before_the_body_ends(
    app, client, session, alice, make_user, blob_dir
):
    participant, model_id, initial = await _started(client, alice, make_user)
    state = state_of(initial)
    wrong = {**state, "fc1.weight": torch.zeros(5, 4)}
    header = codec.encode_safetensors(wrong)
    header_len = struct.unpack("<Q", header[:8])[0]
    before = _blob_files(blob_dir)
    megabyte = b"\0" * MiB
    file_chunks = iter([header[: 8 + header_len], *([megabyte] * 64)])
    status, answer, read, finished = await _drive(
        app,
        f"/api/models/{model_id}/",
        participant.token,
        _multipart({"round": "0", "sample_size": "5"}, file_chunks),
    )
    assert status == 400, answer
    assert answer is not None and answer["code"] == "invalid_model_file"
    assert "fc1.weight" in answer["detail"] and "shape" in answer["detail"]
    assert not finished and read < 10  # answered from the header: the 64 MiB after it were never read
    await _nothing_stored(session, blob_dir, before)
    # An impossible header length is refused from the first 8 bytes of the file.
    bogus = struct.pack("<Q", 2**40) + b"{" + b"\0" * 100
    status, answer, read, finished = await _drive(
        app,
        f"/api/models/{model_id}/",
        participant.token,
        _multipart({"round": "0", "sample_size": "5"}, iter([bogus, *([megabyte] * 64)])),
    )
    assert status == 400 and answer is not None and "header length" in answer["detail"], answer
    assert not finished
    await _nothing_stored(session, blob_dir, before)


async def test_canonical_updates_are_stored_as_received_others_canonicalised(
    app, client, session, alice, make_user, blob_dir
):
    participant, model_id, initial = await _started(client, alice, make_user)
    update = shifted(state_of(initial), 0.25)
    canonical = codec.encode_safetensors(update)
    fields = {"round": "0", "sample_size": "5"}
    status, answer, _, _ = await _drive(
        app, f"/api/models/{model_id}/", participant.token, _multipart(fields, iter([canonical]))
    )
    assert status == 201, answer
    local = (await session.execute(select(LocalModel))).scalar_one()
    assert local.weights_digest == hashlib.sha256(canonical).hexdigest()
    # With metadata (what some writers add): accepted, stored in the canonical layout.
    with_metadata = codec.encode_safetensors(update, metadata={"format": "pt"})
    assert with_metadata != canonical
    status, answer, _, _ = await _drive(
        app, f"/api/models/{model_id}/", participant.token, _multipart(fields, _pieces(with_metadata, 100))
    )
    assert status == 201, answer
    session.expire_all()
    local = (await session.execute(select(LocalModel))).scalar_one()
    assert local.weights_digest == hashlib.sha256(canonical).hexdigest()
    # A TorchScript update (weights extracted by the sandbox from the spooled file) and a
    # weights-only torch.save state dict (memory-mapped): both stored in the canonical layout.
    module = tiny_net(seed=3)
    scripted = scripted_bytes(module)
    buffer = io.BytesIO()
    torch.save(state_of(scripted), buffer)
    for body in (scripted, buffer.getvalue()):
        status, answer, _, _ = await _drive(
            app, f"/api/models/{model_id}/", participant.token, _multipart(fields, _pieces(body, 4096))
        )
        assert status == 201, answer
        session.expire_all()
        local = (await session.execute(select(LocalModel))).scalar_one()
        assert (
            local.weights_digest == hashlib.sha256(codec.encode_safetensors(state_of(scripted))).hexdigest()
        )
    # Non-finite values are found in the stored bytes: refused, nothing new stored.
    before = _blob_files(blob_dir)
    nan = codec.encode_safetensors({**update, "fc1.bias": torch.full((3,), float("nan"))})
    status, answer, _, _ = await _drive(
        app, f"/api/models/{model_id}/", participant.token, _multipart(fields, iter([nan]))
    )
    assert status == 400 and answer is not None and "NaN" in answer["detail"], answer
    assert _blob_files(blob_dir) == before


async def test_values_checked_while_streaming_need_no_second_read(
    app, client, session, alice, make_user, blob_dir, monkeypatch
):
    """A chunked body (its layout known before it): its values are checked as they pass into the
    blob writer (models/stream_values.py), and the spooled file is not read again for them."""
    participant, model_id, initial = await _started(client, alice, make_user)

    def no_second_read(*args: object) -> None:
        raise AssertionError("the spooled file was read again for its values")

    monkeypatch.setattr(uploads, "check_finite", no_second_read)
    update = shifted(state_of(initial), 0.5)
    fields = {"round": "0", "sample_size": "5"}
    bad = codec.encode_safetensors({**update, "fc2.weight": update["fc2.weight"].clone().fill_(float("inf"))})
    before = _blob_files(blob_dir)
    status, answer, _, _ = await _drive(
        app, f"/api/models/{model_id}/", participant.token, _multipart(fields, _pieces(bad, 1001))
    )
    assert status == 400 and answer is not None and "'fc2.weight' contains NaN" in answer["detail"], answer
    assert _blob_files(blob_dir) == before
    good = codec.encode_safetensors(update)
    status, answer, _, _ = await _drive(
        app, f"/api/models/{model_id}/", participant.token, _multipart(fields, _pieces(good, 1001))
    )
    assert status == 201, answer


class _Wide(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.sum()


async def test_large_update_streams_without_being_held(app, client, session, alice, make_user, blob_dir):
    n = 75 * 1024**2 // 4 * 4  # 300 MiB of float32
    module = _Wide(n)
    participant, model_id, _ = await _started(client, alice, make_user, module)
    del module
    spec = {"weight": spec_of({"weight": torch.empty(0)})["weight"]}
    spec["weight"] = type(spec["weight"])((n,), torch.float32)
    header = canonical_header(spec)
    async with app.state.sessionmaker() as warm:  # the global layout is read (and cached) first
        glob_spec = await aggregate.global_spec(warm, __import__("uuid").UUID(model_id), 0)
    assert glob_spec == spec
    chunk = b"\0" * MiB  # one object, sent again and again: the test holds 1 MiB
    digest = hashlib.sha256(header)
    for _ in range(n * 4 // MiB):
        digest.update(chunk)

    def file_chunks() -> Iterator[bytes]:
        yield header
        for _ in range(n * 4 // MiB):
            yield chunk

    tracemalloc.start()
    try:
        status, answer, _, finished = await _drive(
            app,
            f"/api/models/{model_id}/",
            participant.token,
            _multipart({"round": "0", "sample_size": "5"}, file_chunks()),
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 201, answer
    assert finished
    # The body is 300 MiB; the server's Python allocations while it streamed stayed far below.
    assert peak < 48 * MiB, peak
    local = (await session.execute(select(LocalModel))).scalar_one()
    assert local.weights_digest == digest.hexdigest()  # canonical: stored as received
    assert local.weights_size == len(header) + n * 4
