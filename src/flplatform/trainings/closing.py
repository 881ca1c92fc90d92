"""A round's close: the new global model and the aggregator's state of a claimed round, from this
process's folder where it has one (only what is not folded yet is folded now: see
:mod:`flplatform.trainings.folding`), else from every update in the blob store, read as memory
maps; then the order check's settle and redo (:mod:`flplatform.trainings.settling`) and the new
archive (:mod:`flplatform.trainings.archive_plans`). Called by the aggregation job
(:mod:`flplatform.trainings.runtime`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform import aggregation
from flplatform.blobs import BlobInfo, BlobNotFound, BlobStore, store_for
from flplatform.kit import timeline
from flplatform.kit.tasks import spawn
from flplatform.models import files as model_files
from flplatform.orm import LocalModel, Model
from flplatform.trainings import archive_plans, folding
from flplatform.trainings.aggregate import global_weights, stored_bytes
from flplatform.trainings.fold_blobs import FOLD_PASS_UPDATES, fold_blobs
from flplatform.trainings.settling import Rows, finish, new_aggregator

log = logging.getLogger(__name__)


async def aggregate_round(
    sessionmaker: async_sessionmaker[AsyncSession],
    model_id: uuid.UUID,
    round_: int,
    items: Sequence[tuple[uuid.UUID, int]],
    options: dict[str, Any],
    previous_state: str | None,
    report: dict[str, Any] | None = None,
) -> tuple[bytes | memoryview | BlobInfo, bytes]:
    """New global model (TorchScript archive; as a blob already in the store where the archive was
    rebuilt in the server) and the aggregator's state (safetensors) of a claimed
    round: from this process's folder where it has one (only the rest is folded now), else every
    update from the blob store, as memory maps (``previous_state``: the digest of the aggregator's
    state after the last round). ``report`` gets ``folded_on_arrival``: how many updates this
    process's folder had folded before the close (None: no folder here, all folded now)."""
    name, kwargs, _ = folding.method_options(options)
    async with sessionmaker() as session:
        store = store_for(session)
        ids = [local for local, _ in items]
        digests = dict(
            (
                await session.execute(
                    select(LocalModel.id, LocalModel.weights_digest).where(LocalModel.id.in_(ids))
                )
            ).all()
        )
    rows: Rows = {}
    for local, size in items:
        digest = digests.get(local)
        if digest is None:
            raise ValueError(f"local model {local} disappeared during aggregation")
        rows[local] = (digest, size)
    timeline.mark("rows_read")
    folder = await folding.take(model_id, round_)
    if folder is not None:
        try:
            async with folder.lock:
                timeline.mark("folder_lock_taken")
                await folder.fold(rows, ids)
                agg = folder.agg
                assert agg is not None
                folder.agg, folder.closed = None, True  # a sync waiting for the lock finds it closed
            log.info(
                "round %s of model %s: %d of %d updates folded on arrival, %d refold(s)",
                round_,
                model_id,
                folder.on_arrival,
                len(items),
                folder.refolds,
            )
            if report is not None:
                report["folded_on_arrival"] = folder.on_arrival
        finally:
            await folder.close()
    else:
        if report is not None:
            report["folded_on_arrival"] = None
        agg = new_aggregator(name, kwargs)
        global_state, prior = (
            await folding.round_begin_args(sessionmaker, model_id, agg, previous_state)
            if agg.streams
            else await _full_begin_args(sessionmaker, model_id, previous_state)
        )
        await asyncio.to_thread(agg.begin, global_state, prior)
        del global_state, prior
        for start in range(0, len(ids), FOLD_PASS_UPDATES):
            batch = ids[start : start + FOLD_PASS_UPDATES]
            await fold_blobs(
                agg,
                store,
                [(rows[local][0], float(rows[local][1]), f"Local model {local}") for local in batch],
            )
    timeline.mark("rest_folded")
    new_global, new_state = await finish(agg, store, rows, ids)
    del agg
    # The updates are folded and will not be read again: their page-cache pages (the round's model
    # size × clients) go back to the kernel now, so the next round's uploads reuse them instead of
    # pages the kernel must find anew (docs/performance.md: "Recycled page-cache pages").
    spawn(asyncio.to_thread(store.forget_cached, {d for d, _ in rows.values()}), name=f"forget-{model_id}")

    async with sessionmaker() as session:
        template = await _template(session, store, model_id)
    timeline.mark("template_found")
    encoded = await archive_plans.rebuild(model_id, template, new_global, store=store)
    del new_global, template
    timeline.mark("archive_stored")
    new_state_bytes = await asyncio.to_thread(
        aggregation.encode_safetensors, {k: v.contiguous() for k, v in new_state.items()}
    )
    timeline.mark("state_encoded")
    return encoded, new_state_bytes


async def _template(session: AsyncSession, store: BlobStore, model_id: uuid.UUID) -> str | bytes:
    """The global model's archive: its blob's local file where the store keeps one (read piecewise
    by the rebuild, never whole), else its bytes."""
    digest = (
        await session.execute(select(Model.weights_digest).where(Model.id == model_id))
    ).scalar_one_or_none()
    if digest is not None:
        with contextlib.suppress(BlobNotFound):
            path = await store.local_path(digest)
            if path is not None:
                return str(path)
    return await global_weights(session, model_id)


async def _full_begin_args(
    sessionmaker: async_sessionmaker[AsyncSession], model_id: uuid.UUID, previous_state: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``begin``'s arguments for the close-time methods: the global model always (as before)."""
    async with sessionmaker() as session:
        template = await global_weights(session, model_id)
        state_bytes = (
            await stored_bytes(session, previous_state, "The aggregator state") if previous_state else None
        )
    global_state, _ = await model_files.decode_state_dict_async(template)
    prior = aggregation.decode_safetensors(state_bytes, copy=True) if state_bytes else None
    return global_state, prior
