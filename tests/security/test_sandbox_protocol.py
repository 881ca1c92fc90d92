"""The sandbox's pipe protocol: frames over raw (non-blocking) descriptors and tensors as raw
bytes. A worker runs untrusted code, so whatever it sends is checked before anything is
allocated or wrapped: these tests feed the reader what a hostile worker could write."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading

import pytest
import torch

from flplatform.sandbox import protocol
from flplatform.sandbox.protocol import ProtocolError, tensor_blob, tensor_from_blob
from flplatform.sandbox.runner import _clean_env


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def raw_frame(message: dict, blobs: list[bytes], *, declared_total: int | None = None) -> bytes:
    body = json.dumps({**message, "_blobs": [len(b) for b in blobs]}).encode()
    total = sum(len(b) for b in blobs) if declared_total is None else declared_total
    return struct.pack("<4sIQ", b"FLPS", len(body), total) + body + b"".join(blobs)


def test_frames_round_trip_on_blocking_descriptors(pipe):
    read_end, write_end = pipe
    blobs = [b"", b"abc", os.urandom(200_000)]  # larger than a pipe: written while read
    writer = threading.Thread(target=protocol.write_frame_fd, args=(write_end, {"op": "x", "n": 1}, blobs))
    writer.start()
    message, got = protocol.read_frame_fd(read_end, max_blob_bytes=10**6)
    writer.join()
    assert message == {"op": "x", "n": 1}
    assert [bytes(b) for b in got] == blobs


async def test_frames_round_trip_on_the_event_loop(pipe):
    read_end, write_end = pipe
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    blobs = [os.urandom(300_000), b"tail"]
    sent = asyncio.create_task(protocol.write_frame_async(write_end, {"op": "y"}, blobs))
    message, got = await protocol.read_frame_async(read_end, max_blob_bytes=10**6)
    await sent
    assert message == {"op": "y"} and [bytes(b) for b in got] == blobs


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"XXXX" + bytes(12), "magic"),
        (struct.pack("<4sIQ", b"FLPS", 2, 0) + b"[]", "not an object"),
        (struct.pack("<4sIQ", b"FLPS", 3, 0) + b"{x}", "does not parse"),
        (raw_frame({}, [b"ab"], declared_total=3) + b"c", "inconsistent"),
        (raw_frame({}, [b"ab"]) + b"more", "after the end"),
        (raw_frame({}, [b"x" * 10]), "exceed"),  # over max_blob_bytes: refused before allocating
        (raw_frame({}, [b"abcdef"])[:-2], "closed"),
        (b"FLP", "closed"),
    ],
)
def test_malformed_frames_are_refused(pipe, data, error):
    read_end, write_end = pipe
    os.write(write_end, data)
    os.close(write_end)
    with pytest.raises(ProtocolError, match=error):
        protocol.read_frame_fd(read_end, max_blob_bytes=8)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(2, 3, dtype=torch.float64),
        torch.randn(5).to(torch.bfloat16),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        torch.tensor([True, False]),
        torch.zeros(0, 7),
        torch.tensor(1.5),
        torch.randn(4, 6).t(),  # not contiguous: sent as a contiguous copy
    ],
)
def test_tensors_round_trip_as_raw_bytes(tensor):
    spec, raw = tensor_blob(tensor)
    back = tensor_from_blob(json.loads(json.dumps(spec)), bytearray(raw))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_a_received_tensor_owns_its_buffer():
    spec, raw = tensor_blob(torch.ones(4))
    buffer = bytearray(raw)
    tensor = tensor_from_blob(spec, buffer)
    del buffer
    assert tensor.tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("spec", "size", "error"),
    [
        ({"dtype": "object", "shape": [1]}, 8, "not accepted"),
        ({"dtype": "complex64", "shape": [1]}, 8, "not accepted"),
        ({"dtype": 5, "shape": [1]}, 8, "not accepted"),
        ({"dtype": "float32", "shape": [3]}, 8, "is not 8 bytes"),
        ({"dtype": "float32", "shape": [-1, -2]}, 8, "shape"),
        ({"dtype": "float32", "shape": [True, 2]}, 8, "shape"),
        ({"dtype": "float32", "shape": "2"}, 8, "shape"),
        ({"dtype": "float32", "shape": [1] * 17}, 4, "shape"),
        (["float32", [2]], 8, "not an object"),
        (None, 8, "not an object"),
    ],
)
def test_tensor_descriptions_from_a_worker_are_checked(spec, size, error):
    with pytest.raises(ProtocolError, match=error):
        tensor_from_blob(spec, bytearray(size))


def test_workers_wait_passively_in_openmp():
    """Spinning OpenMP threads stalled 2-thread workers on a busy machine (see runner._clean_env)."""
    env = _clean_env("/nonexistent")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert not any(key.startswith("FLP_") for key in env)
