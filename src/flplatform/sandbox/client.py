"""Async API of the model sandbox for the services: every TorchScript operation of the server
goes through here. Answers come from a process that ran untrusted code, so each one is checked
as data (safetensors via the validating codec, archive bytes as a zip with the template's code,
sample tensors against the expected shape) before the server uses it."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flplatform.aggregation.codec import decode_safetensors, encode_safetensors
from flplatform.aggregation.errors import DecodeError
from flplatform.sandbox.opcheck import RefusedModule, prescan_archive
from flplatform.sandbox.protocol import Blob, ProtocolError, WorkerError, tensor_blob, tensor_from_blob
from flplatform.sandbox.runner import SandboxClosed, SandboxCrashed, SandboxTimeout, get_pool

StateDict = dict[str, torch.Tensor]


class SandboxFailure(Exception):
    """A sandbox call failed: ``kind`` is the worker's error kind, or ``timeout``, ``crashed``,
    ``closed`` or ``bad_answer``; ``message`` is meant for the client."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


async def _call(
    message: dict[str, Any], blobs: Sequence[Blob], *, timeout: float | None = None, what: str = "the model"
) -> tuple[dict[str, Any], list[bytearray]]:
    pool = get_pool()
    try:
        return await pool.call(message, blobs, timeout=timeout)
    except WorkerError as exc:
        raise SandboxFailure(exc.kind, exc.message) from None
    except SandboxTimeout as exc:
        raise SandboxFailure("timeout", f"Running {what} in the model sandbox timed out: {exc}.") from None
    except SandboxCrashed as exc:
        raise SandboxFailure("crashed", f"The model sandbox failed while running {what}: {exc}.") from None
    except SandboxClosed:
        raise SandboxFailure("closed", "The server is shutting down; try again.") from None


def _bad(message: str) -> SandboxFailure:
    return SandboxFailure("bad_answer", f"The model sandbox gave an invalid answer: {message}")


def _state(blob: bytearray) -> StateDict:
    try:
        return dict(decode_safetensors(blob, copy=True))
    except DecodeError as exc:
        raise _bad(str(exc)) from None


def _one_blob(blobs: list[bytearray]) -> bytearray:
    if len(blobs) != 1:
        raise _bad(f"{len(blobs)} payloads instead of one")
    return blobs[0]


def _code_entries(data: bytes) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return {
                info.filename.split("/", 1)[-1]: archive.read(info)
                for info in archive.infolist()
                if "/code/" in info.filename
                and info.filename.endswith(".py")
                and info.file_size < 64 * 1024**2
            }
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise _bad(f"not a zip archive ({exc})") from None


# --------------------------------------------------------------------------- uploads and weights


async def check_module(data: bytes, *, kind: str = "model") -> int:
    """Load and check an uploaded archive in the sandbox (op allowlist, no custom __setstate__,
    finite weights for models); returns its parameter count."""
    settings = get_pool().settings
    what = "the preprocessing module" if kind == "preprocessing" else "the uploaded model"
    reply, _ = await _call(
        {"op": "check", "kind": kind}, [data], timeout=settings.check_timeout_seconds, what=what
    )
    count = reply.get("parameters")
    if not isinstance(count, int) or count < 0:
        raise _bad("parameter count")
    return count


@dataclass
class CheckedModel:
    """A global model checked at upload: its parameter count and, per state-dict tensor, dtype,
    shape and the SHA-256 of its bytes (validated here as data)."""

    parameters: int
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], str]]


def _checked_layout(raw: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...], str]]:
    if not isinstance(raw, dict):
        raise _bad("layout")
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], str]] = {}
    for name, item in raw.items():
        if not (isinstance(name, str) and isinstance(item, list) and len(item) == 3):
            raise _bad("layout entry")
        dtype_name, shape, digest = item
        dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
        if (
            not isinstance(dtype, torch.dtype)
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(digest, str)
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            raise _bad(f"layout of tensor {name[:100]!r}")
        tensors[name] = (dtype, tuple(shape), digest)
    return tensors


async def check_model(data: bytes) -> CheckedModel:
    """:func:`check_module` for a global model, also returning its tensors' layout and digests."""
    settings = get_pool().settings
    reply, _ = await _call(
        {"op": "check", "kind": "model", "layout": True},
        [data],
        timeout=settings.check_timeout_seconds,
        what="the uploaded model",
    )
    count = reply.get("parameters")
    if not isinstance(count, int) or count < 0:
        raise _bad("parameter count")
    return CheckedModel(count, _checked_layout(reply.get("layout")))


@dataclass
class Extracted:
    state: StateDict
    parameters: list[str]  # names of the module's parameters, in parameters() order

    @property
    def parameter_count(self) -> int:
        return sum(self.state[name].numel() for name in self.parameters)


async def extract(data: bytes, *, attributes: bool = False, timeout: float | None = None) -> Extracted:
    """The state dict (and parameter names) of a TorchScript archive. ``attributes``: tensors
    held as plain attributes when the state dict is empty (moments saved as scripted modules)."""
    reply, blobs = await _call({"op": "extract", "attributes": attributes}, [data], timeout=timeout)
    state = _state(_one_blob(blobs))
    names = reply.get("parameters")
    if not isinstance(names, list) or not all(isinstance(n, str) and n in state for n in names):
        raise _bad("parameter names")
    return Extracted(state, names)


async def rebuild(template: bytes, state: Mapping[str, torch.Tensor]) -> bytes:
    """The template archive with its weights replaced by ``state`` (what DLR clients download)."""
    encoded = encode_safetensors({k: v.detach().contiguous() for k, v in state.items()})
    _, blobs = await _call({"op": "rebuild"}, [template, encoded], what="the weight update")
    archive = bytes(_one_blob(blobs))
    # The same source files as the template (torch may reformat them when saving again, so
    # names, not bytes) and no custom __setstate__: a worker cannot slip code to the clients.
    if set(_code_entries(archive)) != set(_code_entries(template)):
        raise _bad("the rebuilt archive's code files differ from the template's")
    try:
        prescan_archive(archive)
    except RefusedModule as exc:
        raise _bad(str(exc)) from None
    return archive


async def mean_module(members: list[bytes]) -> bytes:
    """A TorchScript module averaging the members' outputs (a MEAN model's archive)."""
    settings = get_pool().settings
    _, blobs = await _call({"op": "mean"}, members, timeout=settings.check_timeout_seconds,
                           what="the ensemble of the member models")  # fmt: skip
    archive = bytes(_one_blob(blobs))
    if archive[:4] != b"PK\x03\x04" or not _code_entries(archive):
        raise _bad("the ensemble archive is not TorchScript")
    return archive


# --------------------------------------------------------------------------- inference


@dataclass
class ModuleRef:
    """A module the worker may already hold: ``key`` changes whenever the bytes can have changed;
    ``load`` fetches the bytes (from the database) when the worker asks for them."""

    key: str
    load: Callable[[], Awaitable[bytes]]


Tree = dict[str, Any]  # {"key": k} or {"members": [Tree, ...]}


async def _with_modules(
    message: dict[str, Any], fixed: Sequence[Blob], refs: dict[str, ModuleRef], stats: Any, what: str
) -> tuple[dict[str, Any], list[bytearray]]:
    """Ask without module bytes; send the ones the worker reports missing (at most twice more)."""
    attached: dict[str, bytes] = {}
    message = {**message, "keys": list(refs)}
    for attempt in range(3):
        reply, blobs = await _call(
            {**message, "attached": list(attached)}, [*fixed, *attached.values()], what=what
        )
        missing = reply.get("missing")
        if missing is None:
            return reply, blobs
        if (
            not isinstance(missing, list)
            or not missing
            or any(k not in refs or k in attached for k in missing)
        ):
            raise _bad("missing-module list")
        for key in missing:
            if stats is not None:
                stats.misses += 1
            attached[key] = await refs[key].load()
        if attempt == 1:  # a third round trip carries every module
            for key, ref in refs.items():
                if key not in attached:
                    attached[key] = await ref.load()
    raise _bad("modules still missing after sending them")


async def predict(
    *,
    tree: Tree,
    refs: dict[str, ModuleRef],
    preprocessing: str | None,
    inputs: torch.Tensor,
    method: str,
    options: dict[str, Any],
    input_shape: list[int | None] | None,
    max_batch: int,
    expected_samples: int,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    stats: Any = None,
) -> tuple[torch.Tensor, int | None]:
    """The (S, B, ...) stack of predictions and the number of dropout layers (MC dropout).

    Tensors travel as their raw bytes (dtype and shape in the JSON), not as safetensors: no
    encoding, and the answer's tensor wraps the buffer it was read into (the server's own memory,
    filled from the pipe: the worker cannot touch it afterwards)."""
    specs: list[dict[str, Any]] = []
    fixed: list[Blob] = []
    for tensor in (inputs, *(moments or ())):
        spec, raw = tensor_blob(tensor)
        specs.append(spec)
        fixed.append(raw)
    misses_before = stats.misses if stats is not None else 0
    reply, blobs = await _with_modules(
        {"op": "predict", "tree": tree, "preprocessing": preprocessing, "method": method, "options": options,
         "input_shape": input_shape, "max_batch": max_batch, "tensors": specs},
        fixed, refs, stats, "the model",
    )  # fmt: skip
    if stats is not None and stats.misses == misses_before:
        stats.hits += 1
    try:
        samples = tensor_from_blob(reply.get("samples"), _one_blob(blobs))
    except ProtocolError as exc:
        raise _bad(str(exc)) from None
    rows = reply.get("rows")
    if samples.dim() < 2 or not samples.is_floating_point():
        raise _bad("the predictions are not a floating point (samples, batch, ...) tensor")
    if samples.shape[0] != expected_samples or not isinstance(rows, int) or samples.shape[1] != rows:
        raise _bad(f"predictions of shape {list(samples.shape)}")
    if not 1 <= rows <= max_batch:
        raise _bad(f"{rows} rows")
    layers = reply.get("dropout_layers")
    if layers is not None and (not isinstance(layers, int) or layers < 0):
        raise _bad("dropout layer count")
    return samples, layers


async def metadata(
    *, tree: Tree, refs: dict[str, ModuleRef], input_shape: list[int | None] | None, max_elements: int
) -> dict[str, Any]:
    reply, _ = await _with_modules(
        {"op": "metadata", "tree": tree, "input_shape": input_shape, "max_elements": max_elements},
        [],
        refs,
        None,
        "the model summary",
    )
    info = reply.get("metadata")
    expected = {"total_params", "trainable_params", "param_bytes", "layers", "output_shape", "stats"}
    if not isinstance(info, dict) or set(info) != expected:
        raise _bad("metadata fields")
    return info
