"""Decoding untrusted model_input values (pure, no database)."""

from __future__ import annotations

import base64
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from flplatform.uncertainty import InputError, InputLimits, InputTooLarge
from flplatform.uncertainty.inputs import decode_bytes, decode_json_value

LIMITS = InputLimits(max_bytes=1 << 20, max_elements=1000, max_image_pixels=64 * 64)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_dtypes_are_kept_or_made_usable():
    assert decode_bytes(npy(np.arange(6, dtype=np.int32).reshape(2, 3)), LIMITS).tensor.dtype == torch.int32
    assert decode_bytes(npy(np.arange(6, dtype=np.uint16).reshape(2, 3)), LIMITS).tensor.dtype == torch.int64
    assert decode_bytes(npy(np.ones((2, 2), dtype=bool)), LIMITS).tensor.dtype == torch.float32
    assert decode_json_value([[1, 2]], LIMITS).tensor.dtype == torch.float32
    assert (
        decode_bytes(save_safetensors({"a": torch.ones(2, 2, dtype=torch.float16)}), LIMITS).tensor.dtype
        == torch.float16
    )


def test_images_become_a_batch_of_one_in_unit_range():
    gray = decode_bytes(png(np.full((4, 6), 255, dtype=np.uint8)), LIMITS)
    assert gray.kind == "image" and gray.tensor.shape == (1, 1, 4, 6) and torch.all(gray.tensor == 1)
    rgba = decode_bytes(png(np.zeros((4, 6, 4), dtype=np.uint8)), LIMITS)
    assert rgba.tensor.shape == (1, 3, 4, 6)
    deep = decode_bytes(png(np.full((4, 6), 65535, dtype=np.uint16)), LIMITS)
    assert deep.tensor.shape == (1, 1, 4, 6) and torch.allclose(deep.tensor, torch.ones(1, 1, 4, 6))


def test_limits():
    with pytest.raises(InputTooLarge):
        decode_json_value([[0.0] * 1001], LIMITS)
    with pytest.raises(InputTooLarge):
        decode_bytes(npy(np.zeros(1001, dtype=np.float32)), LIMITS)
    with pytest.raises(InputTooLarge):
        decode_bytes(png(np.zeros((65, 64), dtype=np.uint8)), LIMITS)
    with pytest.raises(InputTooLarge):
        decode_bytes(b"\x00" * ((1 << 20) + 1), LIMITS)
    with pytest.raises(InputTooLarge):
        decode_json_value(base64.b64encode(b"\x00" * ((1 << 20) + 10)).decode(), LIMITS)


@pytest.mark.parametrize(
    "payload, message",
    [
        (pickle.dumps(torch.zeros(2)), "pickle"),
        (pickle.dumps({"a": 1}, protocol=4), "pickle"),
        (npy(np.array([object()], dtype=object)), "numeric dtype"),
        (npy(np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f4")])), "numeric dtype"),
        (npy(np.array([1 + 2j])), "numeric dtype"),
        (b"\x93NUMPY\x01\x00garbage", "not a valid .npy"),
        (save_safetensors({"a": torch.zeros(2), "b": torch.zeros(2)}), "name the input"),
        (save_safetensors({"a": torch.zeros(2)})[:-1], "not a valid safetensors"),
        (b"PK\x03\x04rest", "zip archive"),
        (b"\xff\xd8\xff\xe0 not really a jpeg", "not a readable"),
        (b"", "empty"),
        (b"hello world", "no accepted format"),
    ],
)
def test_refusals_say_why(payload, message):
    with pytest.raises(InputError, match=message):
        decode_bytes(payload, LIMITS)


def test_strings_are_base64_or_json_never_paths():
    with pytest.raises(InputError, match="never treated as file paths"):
        decode_json_value("/etc/passwd", LIMITS)
    assert decode_json_value(" [[1, 2], [3, 4]] ", LIMITS).tensor.shape == (2, 2)
    with pytest.raises(InputError, match="at least one dimension"):
        decode_json_value(base64.b64encode(npy(np.float32(3.0))).decode(), LIMITS)
    with pytest.raises(InputError, match="NaN"):
        decode_bytes(npy(np.array([np.nan], dtype=np.float32)), LIMITS)
    with pytest.raises(InputError, match="list or a string"):
        decode_json_value({"a": 1}, LIMITS)
