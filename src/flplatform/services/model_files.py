"""Reading and writing model files without ever unpickling arbitrary objects.

Accepted encodings:

* **TorchScript** archives (``torch.jit.save``): global models (architecture + weights) and
  DLR-style client updates (the server only reads their ``state_dict``).
* **safetensors**: weight-only client updates and SWAG moments.
* ``torch.save`` of a plain state dict / tensor, read with ``torch.load(weights_only=True)``.

Everything else, in particular ``torch.save(module)`` pickles, is refused with
:class:`ModelFileError`, whose message names the accepted formats. All functions here are
synchronous and CPU-bound: call them through ``asyncio.to_thread``.

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
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flplatform.aggregation import codec
from flplatform.aggregation.errors import DecodeError
from flplatform.services.archive_limits import ArchiveTooLarge, check_archive_limits

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
            raise ModelFileError(f"The file is a corrupt or truncated archive ({exc}). " + ACCEPTED_UPDATE_FORMATS)
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


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    fmt = detect_format(data)
    if fmt != TORCHSCRIPT:
        raise ModelFileError(f"Expected a TorchScript archive, got {fmt}. " + ACCEPTED_MODEL_FORMATS)
    try:
        return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError/… for broken archives
        raise ModelFileError(f"Could not load the TorchScript archive: {_short(exc)}") from None


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


def decode_state_dict(data: bytes) -> tuple[StateDict, str]:
    """Weights of an update in any accepted format, and the format's name."""
    fmt = detect_format(data)
    if fmt == TORCHSCRIPT:
        module = load_torchscript(data)
        return {k: v.detach() for k, v in module.state_dict().items()}, fmt
    if fmt == SAFETENSORS:
        return decode_safetensors(data), fmt
    obj = _torch_load_weights_only(data)
    if isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj), fmt
    raise ModelFileError("torch.save files must contain a state dict (str → Tensor). " + ACCEPTED_UPDATE_FORMATS)


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
            raise ModelFileError(f"Tensor {name!r} has dtype {tensor.dtype}, the global model has {spec.dtype}.")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"Tensor {name!r} contains NaN or infinite values.")


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


def rebuild_torchscript(template: bytes, state: Mapping[str, torch.Tensor]) -> bytes:
    """The template TorchScript archive with its weights replaced by ``state``."""
    module = load_torchscript(template)
    current = module.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            current[name].copy_(tensor.to(current[name].dtype))
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def parameter_count(torchscript: bytes) -> int:
    """Length of the flat parameter vector (``net.parameters()`` order), what SWAG moments have."""
    module = load_torchscript(torchscript)
    return sum(p.numel() for p in module.parameters())


def decode_flat_tensor(data: bytes, *, length: int, what: str) -> torch.Tensor:
    """A 1-D float tensor of ``length`` entries from safetensors, TorchScript or weights_only bytes."""
    fmt = detect_format(data)
    tensors: list[torch.Tensor]
    if fmt == SAFETENSORS:
        tensors = list(decode_state_dict(data)[0].values())
    elif fmt == TORCHSCRIPT:
        module = load_torchscript(data)
        tensors = [*module.state_dict().values()]
        if not tensors:
            tensors = [v for _, v in module.named_attributes() if isinstance(v, torch.Tensor)] if hasattr(
                module, "named_attributes"
            ) else []
    else:
        obj = _torch_load_weights_only(data)
        if isinstance(obj, torch.Tensor):
            tensors = [obj]
        elif isinstance(obj, Mapping):
            tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        else:
            tensors = []
    if len(tensors) != 1:
        raise ModelFileError(f"{what}: expected exactly one tensor, found {len(tensors)}.")
    tensor = tensors[0].detach().reshape(-1) if tensors[0].dim() <= 1 else None
    if tensor is None:
        raise ModelFileError(f"{what}: expected a flat 1-D tensor, got shape {list(tensors[0].shape)}.")
    if not tensor.is_floating_point():
        raise ModelFileError(f"{what}: expected floating point values, got {tensor.dtype}.")
    if tensor.numel() != length:
        raise ModelFileError(f"{what}: expected {length} values (the model's parameters), got {tensor.numel()}.")
    if not bool(torch.isfinite(tensor).all()):
        raise ModelFileError(f"{what} contains NaN or infinite values.")
    return tensor.to(torch.float32)


def safetensors_header(data: bytes) -> dict[str, object]:
    """The parsed safetensors JSON header; malformed → :class:`ModelFileError`."""
    try:
        return codec.read_safetensors_header(data)[0]
    except DecodeError as exc:
        raise ModelFileError(f"Corrupt safetensors file: {_short(exc)}") from None
