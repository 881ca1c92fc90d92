"""What the sandbox runs: references to a model's TorchScript modules (weights, a round of its
history, the preprocessing module, the members of a mean model) fetched lazily by key, the SWAG
moments, and the HTTP error for each way a sandbox call fails."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload
from torch import Tensor

from flplatform.aggregation.codec import decode_safetensors
from flplatform.aggregation.errors import DecodeError
from flplatform.blobs import BlobNotFound, store_for
from flplatform.errors import AppError, BadRequest, Conflict, NotFound, PayloadTooLarge, ServiceUnavailable
from flplatform.inference.config import InferenceRuntime
from flplatform.orm import GlobalModel, GlobalModelRound, MeanModel, Model, SWAGModel
from flplatform.sandbox import SandboxFailure
from flplatform.sandbox import client as sandbox
from flplatform.uncertainty import IncompatibleMoments

MAX_ENSEMBLE_DEPTH = 4


class ModelNotRunnable(Conflict):
    code = "model_not_runnable"


class InferenceTimeout(AppError):
    status_code, code = 504, "inference_timeout"


class SandboxFailed(AppError):
    status_code, code = 502, "model_sandbox_failed"


async def _blob(session: AsyncSession, digest: str | None, what: str) -> bytes:
    if digest is None:
        raise ModelNotRunnable(f"{what} has no weights.")
    try:
        data = await store_for(session).read(digest)
    except BlobNotFound:
        raise ModelNotRunnable(f"{what}: its weights are missing from the blob store.") from None
    if not data:
        raise ModelNotRunnable(f"{what} has no weights.")
    return data


def _weights_loader(session: AsyncSession, column: Any, row_id: uuid.UUID, what: str) -> Any:
    async def load() -> bytes:
        digest = (
            await session.execute(select(column).where(column.table.c.id == row_id))
        ).scalar_one_or_none()
        return await _blob(session, digest, what)

    return load


def _module_ref(session: AsyncSession, model: Model, refs: dict[str, sandbox.ModuleRef]) -> sandbox.Tree:
    if model.weights_format not in (None, "torchscript"):
        raise ModelNotRunnable(
            f"Model {model.id} stores only weights ({model.weights_format}), no TorchScript architecture to run."
        )
    # Changes whenever the stored bytes can have changed, so a worker never runs stale weights.
    key = f"weights:{model.id}:{model.round}:{model.updated_at.isoformat() if model.updated_at else ''}:{model.weights_size}"
    refs[key] = sandbox.ModuleRef(
        key, _weights_loader(session, Model.weights_digest, model.id, f"Model {model.id}")
    )
    return {"key": key}


async def history_ref(
    session: AsyncSession, model: GlobalModel, round_: int, refs: dict[str, sandbox.ModuleRef]
) -> tuple[sandbox.Tree, int]:
    """The module of round ``round_`` of the model's history (the latest entry at or before it,
    as the download route does) and the round it was stored for."""
    if round_ > model.round:
        raise NotFound(f"Model {model.id} has no weights for round {round_} (current round: {model.round}).")
    row = (
        await session.execute(
            select(GlobalModelRound.id, GlobalModelRound.round, GlobalModelRound.weights_format)
            .where(GlobalModelRound.model_id == model.id, GlobalModelRound.round <= round_)
            .order_by(GlobalModelRound.round.desc())
            .limit(1)
        )
    ).first()
    if row is None:
        raise NotFound(f"Model {model.id} has no weights for round {round_}.")
    if row.weights_format not in (None, "torchscript"):
        raise ModelNotRunnable(f"Round {row.round} of model {model.id} stores no TorchScript archive.")
    key = f"history:{model.id}:{row.round}"  # history entries never change
    refs[key] = sandbox.ModuleRef(
        key,
        _weights_loader(
            session, GlobalModelRound.weights_digest, row.id, f"Round {row.round} of model {model.id}"
        ),
    )
    return {"key": key}, round_


async def preprocessing_ref(
    session: AsyncSession, model: GlobalModel, refs: dict[str, sandbox.ModuleRef]
) -> str | None:
    if not model.has_preprocessing:
        return None
    digest = (
        await session.execute(select(GlobalModel.preprocessing_digest).where(GlobalModel.id == model.id))
    ).scalar_one()
    if not digest:
        return None
    # Preprocessing can be replaced without touching the models row: key on the bytes' digest.
    key = "preprocessing:" + digest

    async def load() -> bytes:
        return await _blob(session, digest, f"The preprocessing module of model {model.id}")

    refs[key] = sandbox.ModuleRef(key, load)
    return key


async def tree_for(
    session: AsyncSession,
    runtime: InferenceRuntime,
    model: Model,
    depth: int,
    seen: set[uuid.UUID],
    refs: dict[str, sandbox.ModuleRef],
) -> sandbox.Tree:
    if not isinstance(model, MeanModel):
        return _module_ref(session, model, refs)
    if depth >= MAX_ENSEMBLE_DEPTH or model.id in seen:
        raise ModelNotRunnable(f"Mean model {model.id} nests too deeply or contains itself.")
    members = await mean_members(session, model.id)
    if not members:
        raise ModelNotRunnable(f"Mean model {model.id} has no member models.")
    if len(members) > runtime.settings.max_ensemble_members:
        raise ModelNotRunnable(
            f"Mean model {model.id} has {len(members)} members; at most "
            f"{runtime.settings.max_ensemble_members} are run."
        )
    inner = seen | {model.id}
    return {"members": [await tree_for(session, runtime, m, depth + 1, inner, refs) for m in members]}


def sandbox_error(exc: SandboxFailure) -> AppError:
    """The HTTP error for a failed inference or metadata call in the sandbox."""
    kinds: dict[str, AppError] = {
        "moments": Conflict(exc.message, code="swag_moments_invalid"),
        "prediction": BadRequest(exc.message, code="inference_failed"),
        "preprocessing": BadRequest(exc.message, code="preprocessing_failed"),
        "preprocessing_output": ModelNotRunnable(exc.message),
        "input_shape": BadRequest(exc.message, code="input_shape_mismatch"),
        "batch": PayloadTooLarge(exc.message, code="batch_too_large"),
        "refused": ModelNotRunnable(f"The stored model cannot be run: {exc.message}"),
        "invalid": ModelNotRunnable(f"The stored model cannot be run: {exc.message}"),
        "timeout": InferenceTimeout(
            f"{exc.message} The model was stopped (FLP_SANDBOX_CALL_TIMEOUT_SECONDS)."
        ),
        "closed": ServiceUnavailable(exc.message, code="shutting_down"),
    }
    return kinds.get(exc.kind) or SandboxFailed(exc.message)


async def mean_members(session: AsyncSession, mean_id: uuid.UUID) -> list[GlobalModel]:
    mean = (
        await session.execute(
            select(MeanModel).options(selectinload(MeanModel.members)).where(MeanModel.id == mean_id)
        )
    ).scalar_one()
    return sorted(mean.members, key=lambda m: (m.created_at, str(m.id)))


def decode_moment(data: bytes | None, which: str) -> Tensor | None:
    """A stored moment: safetensors with the flat tensor under ``moment`` (or the only tensor),
    decoded as a zero-copy view (the moments are only read)."""
    if not data:
        return None
    try:
        tensors = decode_safetensors(data)
    except DecodeError as exc:
        raise IncompatibleMoments(f"The stored SWAG {which} moment is unreadable ({exc}).") from None
    if "moment" in tensors:
        tensor = tensors["moment"]
    elif len(tensors) == 1:
        tensor = next(iter(tensors.values()))
    else:
        raise IncompatibleMoments(f"The stored SWAG {which} moment holds {len(tensors)} tensors.")
    return tensor.reshape(-1)


async def swag_moments(session: AsyncSession, model: SWAGModel) -> tuple[Tensor, Tensor]:
    # Not cached: the moments change in SWAG rounds without the models row (and so the cache
    # key of the weights) changing, and decoding safetensors is cheap next to N forward passes.
    first_digest, second_digest = (
        await session.execute(
            select(SWAGModel.swag_first_digest, SWAGModel.swag_second_digest).where(SWAGModel.id == model.id)
        )
    ).one()
    what = f"The SWAG moments of model {model.id}"
    first_bytes = None if first_digest is None else await _blob(session, first_digest, what)
    second_bytes = None if second_digest is None else await _blob(session, second_digest, what)
    first, second = await asyncio.to_thread(
        lambda: (decode_moment(first_bytes, "first"), decode_moment(second_bytes, "second"))
    )
    if first is None or second is None:
        raise Conflict(
            f"SWAG model {model.id} has no moments yet (no SWAG round has finished).",
            code="swag_moments_missing",
        )
    return first, second
