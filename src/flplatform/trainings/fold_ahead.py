"""A round's folding, prepared when the round starts instead of at its first upload.

A round's first upload opens its folder (:mod:`~flplatform.trainings.folding`): its first fold
allocates the float64 sum, its close writes the new global into a spare file, and a server's first
round learns the model's storage plan. At the first upload all of that competes with the upload
burst, and on a VM whose balloon takes freed memory back, the fresh sum's first touch alone costs
≈ 100–200 ms: the folder falls behind the burst and a server's first round closed up to ≈ 0.5 s
after its last upload, where later rounds take ≈ 0.3 s (docs/performance.md, "Real-size rounds").

:func:`prepare_round` does it when the round starts (the training's start, the previous round's
commit), in the process that started it, while the clients train: the sum's memory is reserved and
faulted in (:func:`flplatform.aggregation.buffers.reserve`, one reservation per process, taken by
the round's first fold here), the spare file made, the storage plan learned. Only for rounds that
will fold on arrival (a streamed method, updates of at least ``FLP_FOLD_ON_ARRIVAL_MIN_BYTES``).
Nothing here changes a result; a failure only logs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Mapping

import torch
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.aggregation import buffers
from flplatform.aggregation.kernels import accumulator_dtype
from flplatform.blobs import store_for
from flplatform.models import layouts
from flplatform.models.files import TensorSpec
from flplatform.orm import Model, Training, TrainingState
from flplatform.settings import Settings
from flplatform.trainings import archive_plans, folding

log = logging.getLogger(__name__)


def largest_sum_bytes(layout: Mapping[str, TensorSpec], accumulate: torch.dtype) -> int:
    """Bytes of the largest per-dtype accumulator a streamed aggregator allocates for ``layout``."""
    numel: dict[torch.dtype, int] = defaultdict(int)
    for spec in layout.values():
        count = 1
        for dim in spec.shape:
            count *= dim
        numel[spec.dtype] += count
    return max((n * accumulator_dtype(d, accumulate).itemsize for d, n in numel.items()), default=0)


async def prepare_round(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings, training_id: uuid.UUID
) -> None:
    """Prepare this process to fold the training's current round (module docstring)."""
    if settings.fold_max_open_rounds <= 0:
        return
    try:
        async with sessionmaker() as session:
            row = (
                await session.execute(
                    select(
                        Training.state, Training.options, Model.id, Model.weights_digest, Model.weights_size
                    )
                    .join(Model, Model.id == Training.model_id)
                    .where(Training.id == training_id)
                )
            ).one_or_none()
            if row is None:
                return
            state, options, model_id, digest, size = row
            _, _, foldable = folding.method_options(options or {})  # (foldable: a float64 sum)
            if (
                state != TrainingState.ONGOING
                or not foldable
                or digest is None
                or (size or 0) < settings.fold_on_arrival_min_bytes
            ):
                return
            layout = await layouts.stored(session, digest)
            store = store_for(session)
        if layout is not None:
            await asyncio.to_thread(buffers.reserve, largest_sum_bytes(layout, torch.float64))
        await folding.prepare_spare(store, digest)
        if not archive_plans.known(model_id):
            await archive_plans.learn(sessionmaker, model_id)
    except Exception:
        log.info(
            "training %s: preparing the round's fold failed (it folds anyway)", training_id, exc_info=True
        )
