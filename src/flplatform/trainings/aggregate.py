"""Glue between the stores and the tensor code: the global model's tensor specs (for checking
uploads), the training's aggregator options, and the SWAG moments' weighted mean. A round's model
updates are aggregated by :mod:`flplatform.trainings.folding` (folded as they arrive, from memory
maps of the blob store).

Decoding, accumulation and encoding run in worker threads (``asyncio.to_thread``), never on
the event loop; reading and rebuilding the TorchScript template happens in the model sandbox.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform import aggregation
from flplatform.blobs import BlobNotFound, store_for
from flplatform.models import files as model_files
from flplatform.models import layouts
from flplatform.models.files import ModelFileError, StateDict, TensorSpec
from flplatform.orm import Model, SwagStatistic
from flplatform.trainings import archive_plans

_param_count_cache: dict[uuid.UUID, tuple[int, int]] = {}
_cache_lock = threading.Lock()


def forget_cached(model_id: uuid.UUID) -> None:
    with _cache_lock:
        _param_count_cache.pop(model_id, None)


async def stored_bytes(session: AsyncSession, digest: str | None, what: str) -> bytes:
    if digest is None:
        raise ModelFileError(f"{what} has no stored bytes.")
    try:
        return await store_for(session).read(digest)
    except BlobNotFound:
        raise ModelFileError(f"{what}: its bytes are missing from the blob store.") from None


async def global_weights(session: AsyncSession, model_id: uuid.UUID) -> bytes:
    digest = (
        await session.execute(select(Model.weights_digest).where(Model.id == model_id))
    ).scalar_one_or_none()
    data = await stored_bytes(session, digest, "The global model")
    if not data:
        raise ModelFileError("The global model has no weights.")
    return data


async def global_spec(
    session: AsyncSession,
    model_id: uuid.UUID,
    round_: int,
    *,
    persist: bool = True,
    digest: str | None = None,
) -> dict[str, TensorSpec]:
    """The tensor layout of the global model's current weights, what an update is checked against:
    the stored layout of its weights blob (:mod:`flplatform.models.layouts`, never the weights
    themselves), computed from the weights once for a blob that has none. ``round_`` is kept for
    the callers; the layout is keyed by the blob's digest. ``digest``: the weights digest of the
    model row the caller read in this transaction under the training's lock (one SELECT less)."""
    del round_
    if digest is None:
        digest = (
            await session.execute(select(Model.weights_digest).where(Model.id == model_id))
        ).scalar_one_or_none()
    if digest is None:
        raise ModelFileError("The global model has no stored bytes.")

    async def from_weights() -> dict[str, TensorSpec]:
        data = await global_weights(session, model_id)
        state, _ = await model_files.decode_state_dict_async(data)
        # The round's close needs the storage plan of the same archive: learnt from this decode.
        await archive_plans.learn_from(model_id, data, state)
        return model_files.spec_of(state)

    return await layouts.layout_of(session, digest, from_weights, persist=persist)


async def parameter_count(session: AsyncSession, model_id: uuid.UUID, round_: int) -> int:
    with _cache_lock:
        cached = _param_count_cache.get(model_id)
    if cached is not None and cached[0] == round_:
        return cached[1]
    data = await global_weights(session, model_id)
    count = await model_files.parameter_count(data)
    with _cache_lock:
        _param_count_cache[model_id] = (round_, count)
    return count


class WeightedMean:
    """Sample-size-weighted mean of small flat vectors (SWAG moments), in float64."""

    def __init__(self) -> None:
        self.total = 0.0
        self.acc: dict[str, torch.Tensor] = {}

    def add(self, state: StateDict, weight: float) -> None:
        for name, tensor in state.items():
            if name not in self.acc:
                self.acc[name] = torch.zeros(tensor.shape, dtype=torch.float64)
            self.acc[name].add_(tensor.to(torch.float64), alpha=float(weight))
        self.total += float(weight)

    def result(self) -> StateDict:
        if self.total <= 0:
            raise ValueError("the sample sizes of the round sum to zero; nothing to average")
        return {name: (acc / self.total).to(torch.float32) for name, acc in self.acc.items()}


def aggregator_options(options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Name and keyword options of the training's aggregator (``options.aggregator`` + DP)."""
    name = options.get("aggregator") or "fedavg"
    kwargs = dict(options.get("aggregator_options") or {})
    dp = options.get("dp")
    if dp:
        kwargs.setdefault("dp_clip_norm", dp.get("clip_norm"))
        kwargs.setdefault("dp_noise_multiplier", dp.get("noise_multiplier", 0.0))
        if dp.get("seed") is not None:
            kwargs.setdefault("seed", dp["seed"])
    if name == "fedprox" and options.get("mu") is not None:
        kwargs.setdefault("proximal_mu", options["mu"])
    return name, kwargs


def check_aggregator_options(options: dict[str, Any]) -> None:
    """Raises ``AggregationError`` (a ValueError) for an unknown option or a value out of range."""
    name, kwargs = aggregator_options(options)
    aggregation.get(name, **kwargs)


async def aggregate_swag(
    sessionmaker: async_sessionmaker[AsyncSession], items: Sequence[tuple[uuid.UUID, int]]
) -> tuple[bytes, bytes]:
    """Sample-size-weighted mean of the clients' SWAG moments, as safetensors (key ``moment``)."""
    accumulator = WeightedMean()
    for stat_id, sample_size in items:
        async with sessionmaker() as session:
            row = (
                await session.execute(
                    select(SwagStatistic.first_moment_digest, SwagStatistic.second_moment_digest).where(
                        SwagStatistic.id == stat_id
                    )
                )
            ).one()
            if row[0] is None or row[1] is None:
                raise ValueError(f"SWAG statistic {stat_id} has no stored moments.")
            first_moment = await stored_bytes(session, row[0], f"SWAG statistic {stat_id}")
            second_moment = await stored_bytes(session, row[1], f"SWAG statistic {stat_id}")
        first = await asyncio.to_thread(model_files.decode_safetensors, first_moment)
        second = await asyncio.to_thread(model_files.decode_safetensors, second_moment)
        await asyncio.to_thread(
            accumulator.add, {"first": first["moment"], "second": second["moment"]}, float(sample_size)
        )
    result = await asyncio.to_thread(accumulator.result)
    first_bytes = await asyncio.to_thread(model_files.encode_safetensors, {"moment": result["first"]})
    second_bytes = await asyncio.to_thread(model_files.encode_safetensors, {"moment": result["second"]})
    return first_bytes, second_bytes
