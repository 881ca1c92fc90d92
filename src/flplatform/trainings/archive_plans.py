"""The storage plans of global models' TorchScript archives in this process, and the new global
archive of a round: its storages replaced in the server where the plan is known and fits
(:mod:`flplatform.models.archive_weights`), else rebuilt in the model sandbox (and the plan learnt
from that). :func:`learn` learns a model's plan from its current archive while a round's uploads
arrive (stored with the layout when the model was uploaded; else the sandbox decodes it once), so
even the first round's close needs no sandbox rebuild."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.blobs import BlobInfo, BlobStore, store_for
from flplatform.models import archive_weights, layouts
from flplatform.models import files as model_files
from flplatform.orm import Model

log = logging.getLogger(__name__)

# model id -> where its TorchScript archive keeps each tensor (models/archive_weights.py)
_PLANS: dict[uuid.UUID, archive_weights.Plan] = {}
MAX_PLANS = 256


def _remember_plan(model_id: uuid.UUID, plan: archive_weights.Plan | None) -> None:
    if plan is None:
        return
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[model_id] = plan


async def rebuild(
    model_id: uuid.UUID,
    template: archive_weights.Archive,
    state: Mapping[str, torch.Tensor],
    *,
    store: BlobStore | None = None,
) -> bytes | memoryview | BlobInfo:
    """The template archive (in memory, or the blob's local file) with the new weights: its storages
    replaced here where the model's storage plan is known and fits, else rebuilt in the sandbox
    (and the plan learnt from that). With ``store``, the replaced archive is written entry by entry
    straight into a blob of it (returned as its ``BlobInfo``: no copy of it in memory)."""
    plan = _PLANS.get(model_id)
    if plan is not None and await asyncio.to_thread(archive_weights.fits, template, plan, state):
        if store is not None:
            return await store.writer().commit_built(
                lambda sink: archive_weights.write_replaced(template, plan, state, sink)
            )
        return await asyncio.to_thread(archive_weights.replace_weights, template, plan, state)
    if not isinstance(template, (bytes, memoryview)):
        template = await asyncio.to_thread(Path(template).read_bytes)
    encoded = await model_files.rebuild_torchscript(bytes(template), state)
    _remember_plan(model_id, await asyncio.to_thread(archive_weights.storage_plan, encoded, state))
    return encoded


async def learn(sessionmaker: async_sessionmaker[AsyncSession], model_id: uuid.UUID) -> None:
    """Learn the model's storage plan from its current archive while the round's uploads arrive (the
    sandbox decodes it once), so that even the first round's close needs no sandbox rebuild."""
    if model_id in _PLANS:
        return
    try:
        async with sessionmaker() as session:
            digest = (
                await session.execute(select(Model.weights_digest).where(Model.id == model_id))
            ).scalar_one_or_none()
            if digest is None:
                return
            plan = await layouts.stored_plan(session, digest)  # found when the model was uploaded
            if plan is not None:
                _remember_plan(model_id, plan)
                return
            template = await store_for(session).read(digest)
        state, _ = await model_files.decode_state_dict_async(template)
        _remember_plan(model_id, await asyncio.to_thread(archive_weights.storage_plan, template, state))
    except Exception:  # the close-time rebuild in the sandbox still works (and learns it)
        log.info("model %s: no storage plan from its archive", model_id, exc_info=True)


async def learn_from(model_id: uuid.UUID, template: bytes, state: Mapping[str, torch.Tensor]) -> None:
    """Learn the model's storage plan from an archive and the state the sandbox decoded from it
    (the first upload's layout read decodes it anyway: one decode serves both)."""
    if model_id not in _PLANS:
        _remember_plan(model_id, await asyncio.to_thread(archive_weights.storage_plan, template, state))


def known(model_id: uuid.UUID) -> bool:
    return model_id in _PLANS
