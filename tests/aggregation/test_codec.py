"""Zero-copy safetensors decoding, encoding, malformed files, flat layouts."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from flplatform.aggregation import DecodeError, decode_safetensors, encode_safetensors
from flplatform.aggregation.codec import FlatLayout, read_safetensors_header, safetensors_order


def sample_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "layer.weight": torch.randn(16, 8),
        "layer.bias": torch.randn(16),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(5).half(),
        "brain": torch.randn(3).bfloat16(),
        "double": torch.randn(2, 2, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
    }


def build(header: dict, body: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def test_zero_copy_roundtrip_with_the_safetensors_library():
    state = sample_state()
    data = save(state)
    decoded = decode_safetensors(data)
    assert set(decoded) == set(state)
    buffer_start = torch.frombuffer(bytearray(1), dtype=torch.uint8)  # noqa: F841 (address sanity below)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    del raw
    for name, tensor in state.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor), name
    # views: they point into the bytes object itself (no copy)
    import ctypes

    start = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    for name, tensor in decoded.items():
        if tensor.numel():
            assert start <= tensor.data_ptr() < start + len(data), name
    copied = decode_safetensors(data, copy=True)
    for name, tensor in copied.items():
        if tensor.numel():
            assert not start <= tensor.data_ptr() < start + len(data)
        assert torch.equal(tensor, state[name])


def test_encoder_matches_the_library_byte_for_byte_and_loads_back():
    state = sample_state()
    ours = encode_safetensors(state)
    assert ours == save(state)
    loaded = load(ours)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with_meta = encode_safetensors(state, metadata={"round": 3})
    header, _ = read_safetensors_header(with_meta)
    assert header["__metadata__"] == {"round": "3"}
    assert all(torch.equal(load(with_meta)[k], v) for k, v in state.items())


def test_encoder_accepts_views_of_one_buffer_and_non_contiguous_tensors():
    flat = torch.arange(12, dtype=torch.float32)
    state = {"a": flat[:6].view(2, 3), "b": flat[6:].view(3, 2).t()}
    loaded = load(encode_safetensors(state))
    assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])


def test_misaligned_tensor_is_copied_not_viewed():
    body = b"\x01" + struct.pack("<2f", 1.5, -2.0)
    data = build(
        {
            "byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
        },
        body,
    )
    decoded = decode_safetensors(data)
    assert decoded["f"].tolist() == [1.5, -2.0]
    assert decoded["f"].data_ptr() % 4 == 0


GOOD_BODY = struct.pack("<4f", 1, 2, 3, 4)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "shorter"),
        (b"\x05\x00\x00", "shorter"),
        (struct.pack("<Q", 0), "out of range"),
        (struct.pack("<Q", 10**12) + b"{}", "out of range"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"{]}x", "JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "JSON"),
        (build([1, 2], b""), "not a JSON object"),
        (build({"t": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, GOOD_BODY), "dtype"),
        (build({"t": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, GOOD_BODY), "shape"),
        (build({"t": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, GOOD_BODY), "shape"),
        (build({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, GOOD_BODY), "outside"),
        (build({"t": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, GOOD_BODY), "outside"),
        (build({"t": {"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]}}, GOOD_BODY), "outside"),
        (build({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, GOOD_BODY), "data_offsets"),
        (build({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, GOOD_BODY), "needs 16 bytes"),
        (build({"t": {"dtype": "F32", "shape": [4]}}, GOOD_BODY), "data_offsets"),
        (build({"t": [1]}, GOOD_BODY), "not an object"),
        (
            build(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                GOOD_BODY,
            ),
            "overlap",
        ),
        (build({"__metadata__": {"k": 1}}, b""), "__metadata__"),
        (save({"w": torch.ones(100)})[:-1], "outside"),
    ],
)
def test_malformed_files_raise_decode_error(data, message):
    with pytest.raises(DecodeError, match=message):
        decode_safetensors(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_corrupted_or_truncated_files_only_ever_raise_decode_error(position, value, cut):
    data = bytearray(save({"w": torch.ones(8, 3), "b": torch.zeros(3), "n": torch.tensor(1)}))
    data[position % len(data)] = value
    data = bytes(data[: len(data) - cut % 40])
    try:
        decoded = decode_safetensors(data)
    except DecodeError:
        return
    for tensor in decoded.values():  # whatever decodes is readable and in bounds
        tensor.sum()


def test_flat_layout_detects_contiguous_groups():
    state = sample_state()
    layout = FlatLayout(state)
    assert layout.names == list(state)
    decoded = decode_safetensors(save(state))
    for dtype in layout.groups:
        view = layout.flat_view(decoded, dtype)
        assert view is not None and view.numel() == layout.numel[dtype]
        assert torch.equal(view, layout.flatten(state, dtype))
    # separately allocated tensors are not one range (unless a group has a single tensor)
    assert layout.flat_view(state, torch.float32) is None
    flats = {d: layout.flatten(state, d) for d in layout.groups}
    views = layout.views(flats)
    assert list(views) == list(state)
    assert all(torch.equal(views[k], v) for k, v in state.items())
    assert layout.flat_view(views, torch.float32) is not None
    assert safetensors_order(state)[0] == "bn.num_batches_tracked"


def test_updates_sharing_one_header_decode_their_own_values_and_sizes_are_rechecked():
    # Headers are parsed once and remembered: the values must still come from each file, a file
    # whose data region does not fit the (cached) header must still be refused, and shapes,
    # strides and 0-d scalars must come out as the library's.
    shapes = {"w": (3, 4), "b": (4,), "s": (), "e": (0, 2), "cube": (2, 1, 3)}
    blobs = [save({k: torch.full(shape, float(i)) for k, shape in shapes.items()}) for i in range(3)]
    assert len({read_safetensors_header(b)[1] for b in blobs}) == 1
    for i, blob in enumerate(blobs):
        decoded = decode_safetensors(blob)
        for name, shape in shapes.items():
            tensor = decoded[name]
            reference = load(blob)[name]
            assert tensor.shape == shape and tensor.stride() == reference.stride(), name
            assert tensor.is_contiguous() and torch.equal(tensor, reference), name
            assert torch.all(tensor == i)
    with pytest.raises(DecodeError, match="outside"):
        decode_safetensors(blobs[0][:-4])
    assert torch.equal(decode_safetensors(blobs[1])["w"], torch.ones(3, 4))  # the cache is intact
