"""Reading and writing model files without ever unpickling arbitrary objects.

Accepted encodings:

* **TorchScript** archives (``torch.jit.save``): global models (architecture + weights) and
  DLR-style client updates (the server only reads their ``state_dict``).
* **safetensors**: weight-only client updates and SWAG moments.
* ``torch.save`` of a plain state dict / tensor, read with ``torch.load(weights_only=True)``.

Everything else, in particular ``torch.save(module)`` pickles, is refused with
:class:`ModelFileError`, whose message names the accepted formats. The synchronous functions
are CPU-bound: call them through ``asyncio.to_thread``. TorchScript archives are code and are
never loaded here: the ``async`` functions send them to the model sandbox
(:mod:`flplatform.sandbox`) and get plain tensors back.

Tensor arithmetic (FedAvg, robust aggregators, SWAG moment averaging) lives in
``flplatform.aggregation``; this module only (de)serialises and validates. The safetensors
format itself (header checks, decoding, encoding) is ``flplatform.aggregation.codec``'s: one
implementation for uploads, stored models and the aggregation hot path.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from flplatform.aggregation import codec
from flplatform.aggregation.errors import DecodeError
from flplatform.errors import ServiceUnavailable
from flplatform.models.archive_limits import ArchiveTooLarge, check_archive_limits

ACCEPTED_UPDATE_FORMATS = (
    "Accepted formats: a TorchScript archive (torch.jit.save), safetensors, or torch.save of a plain "
    "state dict (read with weights_only=True). Pickled modules (torch.save(model)) are refused."
)
ACCEPTED_MODEL_FORMATS = (
    "Accepted format for a model: a TorchScript archive (torch.jit.save(torch.jit.script(model))). "
    "Pickled modules (torch.save(model)) are refused."
)

TORCHSCRIPT = "torchscript"
SAFETENSORS = "safetensors"
TORCH_STATE_DICT = "torch-state-dict"

StateDict = dict[str, torch.Tensor]


class ModelFileError(ValueError):
    """The uploaded bytes are not an acceptable, consistent model file (a 4xx, never a 500)."""


def detect_format(data: bytes) -> str:
    """``torchscript``, ``safetensors`` or ``torch-state-dict``; raises for anything else."""
    if len(data) < 8:
        raise ModelFileError("The file is empty or truncated. " + ACCEPTED_UPDATE_FORMATS)
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                check_archive_limits(archive, len(data))
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
    (header_len,) = struct.unpack("<Q", data[:8])
    if 0 < header_len <= len(data) - 8 and data[8:9] == b"{":
        return SAFETENSORS
    if data[:1] == b"\x80" or data[:2] == b"\x8a\x0a":
        raise ModelFileError("Plain pickles are never loaded. " + ACCEPTED_UPDATE_FORMATS)
    raise ModelFileError("Unrecognised file format. " + ACCEPTED_UPDATE_FORMATS)


T = TypeVar("T")


async def sandboxed(call: Awaitable[T]) -> T:
    """Await a sandbox call; its failures (refused op, timeout, crash, invalid archive) become
    :class:`ModelFileError` (a 400 at upload), a shutting-down server a 503."""
    from flplatform.sandbox import SandboxFailure

    try:
        return await call
    except SandboxFailure as exc:
        if exc.kind == "closed":
            raise ServiceUnavailable(exc.message, code="shutting_down") from None
        raise ModelFileError(exc.message) from None


def require_torchscript(data: bytes) -> None:
    fmt = detect_format(data)
    if fmt != TORCHSCRIPT:
        raise ModelFileError(f"Expected a TorchScript archive, got {fmt}. " + ACCEPTED_MODEL_FORMATS)


async def check_torchscript(data: bytes, *, kind: str = "model") -> int:
    """Check an uploaded archive in the sandbox; returns its parameter count."""
    from flplatform.sandbox import client

    require_torchscript(data)
    return await sandboxed(client.check_module(data, kind=kind))


async def torchscript_state(data: bytes, *, attributes: bool = False) -> tuple[StateDict, int]:
    """State dict and parameter count of a TorchScript archive, extracted in the sandbox."""
    from flplatform.sandbox import client

    require_torchscript(data)
    extracted = await sandboxed(client.extract(data, attributes=attributes))
    return extracted.state, extracted.parameter_count


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _torch_load_weights_only(data: bytes) -> object:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            "The file needs unpickling arbitrary objects, which is refused "
            f"({_short(exc)}). " + ACCEPTED_UPDATE_FORMATS
        ) from None
    except Exception as exc:
        raise ModelFileError(f"Could not read the file: {_short(exc)}. " + ACCEPTED_UPDATE_FORMATS) from None


async def decode_state_dict_async(data: bytes) -> tuple[StateDict, str]:
    """Weights of an update in any accepted format (TorchScript through the sandbox)."""
    import asyncio

    fmt = await asyncio.to_thread(detect_format, data)
    if fmt == TORCHSCRIPT:
        return (await torchscript_state(data))[0], fmt
    return await asyncio.to_thread(decode_state_dict, data)


def decode_state_dict(data: bytes) -> tuple[StateDict, str]:
    """Weights of a safetensors or weights-only ``torch.save`` file, and the format's name;
    TorchScript needs :func:`decode_state_dict_async` (the sandbox)."""
    fmt = detect_format(data)
    if fmt == TORCHSCRIPT:
        raise ModelFileError(
            "TorchScript archives are only read by the model sandbox (decode_state_dict_async)."
        )
    if fmt == SAFETENSORS:
        return decode_safetensors(data), fmt
    obj = _torch_load_weights_only(data)
    if isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return dict(obj), fmt
    raise ModelFileError(
        "torch.save files must contain a state dict (str → Tensor). " + ACCEPTED_UPDATE_FORMATS
    )


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def spec_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}


def validate_state_dict(state: Mapping[str, torch.Tensor], reference: Mapping[str, TensorSpec]) -> None:
    """Same names, shapes and dtypes as the global model, and only finite float values."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}")
        raise ModelFileError("The update does not match the global model: " + ", ".join(parts) + ".")
    for name, spec in reference.items():
        tensor = state[name]
        if tuple(tensor.shape) != spec.shape:
            raise ModelFileError(
                f"Tensor {name!r} has shape {list(tensor.shape)}, the global model has {list(spec.shape)}."
            )
        if tensor.dtype != spec.dtype:
            raise ModelFileError(
                f"Tensor {name!r} has dtype {tensor.dtype}, the global model has {spec.dtype}."
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"Tensor {name!r} contains NaN or infinite values.")


def checked_update(data: bytes, reference: Mapping[str, TensorSpec]) -> bytes | None:
    """A client update checked against the global model's layout (:func:`validate_state_dict`)
    and re-encoded as standard safetensors, in one pass for one thread hop; ``None`` for a
    TorchScript archive, whose weights only the sandbox reads (:func:`decode_state_dict_async`).
    safetensors is checked on zero-copy views of ``data`` (nothing is copied before the
    encoding); the errors are :func:`decode_state_dict`'s."""
    fmt = detect_format(data)
    if fmt == TORCHSCRIPT:
        return None
    if fmt == SAFETENSORS:
        try:
            state: Mapping[str, torch.Tensor] = codec.decode_safetensors(data, copy=False)
        except DecodeError as exc:
            raise ModelFileError(f"Corrupt safetensors file: {_short(exc)}") from None
    else:
        state = decode_state_dict(data)[0]
    validate_state_dict(state, reference)
    return encode_safetensors(state)


def encode_safetensors(state: Mapping[str, torch.Tensor]) -> bytes:
    """Standard safetensors bytes (the same bytes ``safetensors.torch.save`` writes)."""
    return codec.encode_safetensors(state)


def decode_safetensors(data: bytes) -> StateDict:
    """Independent, writable tensors of safetensors bytes (ordered as in the file); any malformed
    or truncated file → :class:`ModelFileError`."""
    try:
        return codec.decode_safetensors(data, copy=True)
    except DecodeError as exc:
        raise ModelFileError(f"Corrupt safetensors file: {_short(exc)}") from None


async def rebuild_torchscript(template: bytes, state: Mapping[str, torch.Tensor]) -> bytes:
    """The template TorchScript archive with its weights replaced by ``state`` (in the sandbox)."""
    from flplatform.sandbox import client

    return await sandboxed(client.rebuild(template, state))


async def parameter_count(torchscript: bytes) -> int:
    """Length of the flat parameter vector (``net.parameters()`` order), what SWAG moments have."""
    return (await torchscript_state(torchscript))[1]


async def decode_flat_tensor_async(data: bytes, *, length: int, what: str) -> torch.Tensor:
    """:func:`decode_flat_tensor` for any accepted format (TorchScript tensors from the sandbox)."""
    import asyncio

    if await asyncio.to_thread(detect_format, data) == TORCHSCRIPT:
        state, _ = await torchscript_state(data, attributes=True)
        return await asyncio.to_thread(flat_tensor, list(state.values()), length=length, what=what)
    return await asyncio.to_thread(decode_flat_tensor, data, length=length, what=what)


def decode_flat_tensor(data: bytes, *, length: int, what: str) -> torch.Tensor:
    """A 1-D float tensor of ``length`` entries from safetensors or weights_only bytes."""
    fmt = detect_format(data)
    tensors: list[torch.Tensor]
    if fmt == SAFETENSORS:
        tensors = list(decode_state_dict(data)[0].values())
    elif fmt == TORCHSCRIPT:
        raise ModelFileError(
            f"{what}: TorchScript is only read by the model sandbox (decode_flat_tensor_async)."
        )
    else:
        obj = _torch_load_weights_only(data)
        if isinstance(obj, torch.Tensor):
            tensors = [obj]
        elif isinstance(obj, Mapping):
            tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        else:
            tensors = []
    return flat_tensor(tensors, length=length, what=what)


def flat_tensor(tensors: list[torch.Tensor], *, length: int, what: str) -> torch.Tensor:
    """The only tensor of ``tensors``, checked to be a finite flat float vector of ``length``."""
    if len(tensors) != 1:
        raise ModelFileError(f"{what}: expected exactly one tensor, found {len(tensors)}.")
    tensor = tensors[0].detach().reshape(-1) if tensors[0].dim() <= 1 else None
    if tensor is None:
        raise ModelFileError(f"{what}: expected a flat 1-D tensor, got shape {list(tensors[0].shape)}.")
    if not tensor.is_floating_point():
        raise ModelFileError(f"{what}: expected floating point values, got {tensor.dtype}.")
    if tensor.numel() != length:
        raise ModelFileError(
            f"{what}: expected {length} values (the model's parameters), got {tensor.numel()}."
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ModelFileError(f"{what} contains NaN or infinite values.")
    return tensor.to(torch.float32)


def safetensors_header(data: bytes) -> dict[str, object]:
    """The parsed safetensors JSON header; malformed → :class:`ModelFileError`."""
    try:
        return codec.read_safetensors_header(data)[0]
    except DecodeError as exc:
        raise ModelFileError(f"Corrupt safetensors file: {_short(exc)}") from None
