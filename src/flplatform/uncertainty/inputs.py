"""Decode untrusted ``model_input`` values into tensors (no web or DB imports).

Accepted: nested JSON lists of numbers; safetensors bytes (the tensor named ``model_input``,
or the only tensor); NumPy ``.npy`` bytes (``allow_pickle=False``, numeric dtypes only);
PNG or JPEG images (for models with a preprocessing module); base64 of any of these bytes.
Never accepted: pickles, ``torch.save`` archives (they need unpickling) and file paths —
a string is only ever base64 (or a JSON list), never opened. Every refusal is an ``InputError``
with a message meant for the client.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

InputKind = Literal["json", "safetensors", "npy", "image"]

_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_ZIP_MAGIC = b"PK\x03\x04"
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float


class InputError(ValueError):
    """The input cannot be used; the message says why and what is accepted."""


class InputTooLarge(InputError):
    """The input exceeds a configured limit."""


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int = 64 * 1024**2
    max_elements: int = 16 * 1024**2
    max_image_pixels: int = 16 * 1024**2


@dataclass
class DecodedInput:
    tensor: Tensor
    kind: InputKind


ACCEPTED = (
    "Send model_input as a nested JSON list of numbers, or as safetensors, .npy or PNG/JPEG bytes "
    "(raw in a multipart file, or base64 in a string)."
)


def decode_json_value(value: Any, limits: InputLimits) -> DecodedInput:
    """A JSON ``model_input``: a nested list, or a string holding base64 (or a JSON list)."""
    if isinstance(value, str):
        return decode_text(value, limits)
    if isinstance(value, list):
        return DecodedInput(_list_to_tensor(value, limits), "json")
    raise InputError(f"model_input must be a list or a string, not {type(value).__name__}. {ACCEPTED}")


def decode_text(text: str, limits: InputLimits) -> DecodedInput:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except (ValueError, RecursionError):
            raise InputError("model_input looks like a JSON list but does not parse.") from None
        return DecodedInput(_list_to_tensor(value, limits), "json")
    stripped = _DATA_URL.sub("", stripped, count=1)
    if len(stripped) > limits.max_bytes * 4 // 3 + 4:
        raise InputTooLarge(f"model_input is larger than {limits.max_bytes} bytes.")
    compact = "".join(stripped.split())
    try:
        if "-" in compact or "_" in compact:
            data = base64.b64decode(compact, altchars=b"-_", validate=True)
        else:
            data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"model_input is a string but not base64. Strings are never treated as file paths. {ACCEPTED}"
        ) from None
    return decode_bytes(data, limits)


def decode_bytes(data: bytes, limits: InputLimits) -> DecodedInput:
    if len(data) > limits.max_bytes:
        raise InputTooLarge(f"model_input is larger than {limits.max_bytes} bytes.")
    if not data:
        raise InputError(f"model_input is empty. {ACCEPTED}")
    if data.startswith(_NPY_MAGIC):
        return DecodedInput(_npy_to_tensor(data, limits), "npy")
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        return DecodedInput(_image_to_tensor(data, limits), "image")
    if data.startswith(_ZIP_MAGIC):
        raise InputError(
            "model_input is a zip archive (torch.save or .npz); these are refused because loading them "
            f"can require unpickling. {ACCEPTED}"
        )
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        raise InputError(f"model_input is a Python pickle; pickles are never loaded. {ACCEPTED}")
    if _looks_like_safetensors(data):
        return DecodedInput(_safetensors_to_tensor(data, limits), "safetensors")
    if data.lstrip()[:1] == b"[":
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            raise InputError("model_input looks like a JSON list but does not parse.") from None
        return DecodedInput(_list_to_tensor(value, limits), "json")
    raise InputError(f"model_input bytes are in no accepted format. {ACCEPTED}")


# --------------------------------------------------------------------------- formats


def _list_to_tensor(value: Any, limits: InputLimits) -> Tensor:
    if not isinstance(value, list):
        raise InputError(f"model_input must be a (nested) list of numbers. {ACCEPTED}")
    try:
        tensor = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InputError(
            "model_input must be a rectangular nested list of numbers "
            f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})."
        ) from None
    return _checked(tensor, limits)


def _npy_to_tensor(data: bytes, limits: InputLimits) -> Tensor:
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, SyntaxError, TypeError, struct.error) as exc:
        raise InputError(f"model_input is not a valid .npy file ({exc}).") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in _NUMERIC_KINDS:
        raise InputError(
            f".npy arrays must have a numeric dtype (bool, int, uint, float); got {dtype}. "
            "Object arrays would need unpickling and are refused."
        )
    if int(np.prod(shape, dtype=np.int64)) > limits.max_elements:
        raise InputTooLarge(f"model_input has more than {limits.max_elements} elements.")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"model_input is not a valid .npy file ({str(exc)[:200]}).") from None
    # Native byte order and C order (torch has neither big-endian nor strided-negative views);
    # not ascontiguousarray, which would turn a 0-d array into 1-d.
    array = array.astype(array.dtype.newbyteorder("="), order="C", copy=False)
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)
    return _checked(torch.from_numpy(array), limits)


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_length,) = struct.unpack("<Q", data[:8])
    return 2 <= header_length <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_to_tensor(data: bytes, limits: InputLimits) -> Tensor:
    from flplatform.aggregation.codec import decode_safetensors
    from flplatform.aggregation.errors import DecodeError

    try:
        tensors = decode_safetensors(data, copy=True)  # every header field checked
    except DecodeError as exc:
        raise InputError(f"model_input is not a valid safetensors file ({str(exc)[:200]}).") from None
    if "model_input" in tensors:
        tensor = tensors["model_input"]
    elif len(tensors) == 1:
        tensor = next(iter(tensors.values()))
    else:
        raise InputError(
            f"The safetensors file holds {len(tensors)} tensors; name the input 'model_input' or send one tensor."
        )
    if tensor.is_complex() or tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise InputError(f"Unsupported input dtype {tensor.dtype}.")
    return _checked(tensor, limits)


def _image_to_tensor(data: bytes, limits: InputLimits) -> Tensor:
    """PNG/JPEG → float32 (1, C, H, W) in [0, 1]: grayscale → 1 channel, colour → 3 (RGB, alpha
    dropped), 16-bit grayscale scaled by 65535. A batch of one, ready for the preprocessing module."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise InputTooLarge(f"The image has more than {limits.max_image_pixels} pixels.")
            mode = image.mode
            if mode.startswith("I;16"):
                array = np.asarray(image, dtype=np.float32) / 65535.0
            elif mode in ("I", "F"):
                array = np.asarray(image, dtype=np.float32)
            elif mode in ("1", "L", "LA"):
                array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
            else:
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"model_input is not a readable PNG/JPEG image ({str(exc)[:200]}).") from None
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return _checked(tensor.unsqueeze(0).contiguous(), limits)


def _checked(tensor: Tensor, limits: InputLimits) -> Tensor:
    if tensor.dim() == 0:
        raise InputError("model_input must have at least one dimension (the batch).")
    if tensor.numel() > limits.max_elements:
        raise InputTooLarge(f"model_input has more than {limits.max_elements} elements.")
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.float32)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InputError("model_input contains NaN or infinite values.")
    return tensor
