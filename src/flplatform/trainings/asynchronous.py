"""Asynchronous rounds (``options.mode = "async"``): FedBuff (Nguyen et al. 2022) on the
training engine.

The training stays in its update phase. Participants train from the newest global version they
can get and upload whenever they finish, naming the version in the wire contract's ``round``
field; every upload waits in the buffer (:mod:`~flplatform.trainings.buffer`). Once
``buffer_size`` updates wait (:func:`~flplatform.trainings.rounds.round_condition`, kind
``"buffer"``), :class:`~flplatform.trainings.runtime.TrainingRuntime` claims the first ``K`` of
them exactly as it claims a synchronous round (row lock, ``locked`` + lease, a
``training.aggregate`` job of kind ``"buffer"`` in the same transaction) and uploads keep being
accepted meanwhile (they wait for the next version). The job folds the claimed updates with
:class:`flplatform.aggregation.FedBuff` (:func:`fold_buffer`) and commits the new version while
the claim holds, marking the folded updates in the same transaction (:func:`after_fold`), so each
update is folded exactly once across any number of workers. The training completes after
``target_num_updates`` new versions.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.aggregation import FedBuff, encode_safetensors
from flplatform.blobs import BlobNotFound, store_for
from flplatform.blobs.mapped import mapped
from flplatform.kit.tasks import spawn
from flplatform.models import files as model_files
from flplatform.models.files import ModelFileError, StateDict
from flplatform.orm import GlobalModel, GlobalModelRound, LocalModel, Model, Training
from flplatform.trainings import buffer
from flplatform.trainings.phases import fail, next_or_finish
from flplatform.trainings.rounds import RoundCondition

log = logging.getLogger(__name__)

KIND = "buffer"  # the aggregation job's kind
METHOD = "fedbuff"  # what the events and metrics call the rule


async def take_buffer(
    session: AsyncSession, training: Training, condition: RoundCondition
) -> dict[uuid.UUID, tuple[uuid.UUID, int]] | None:
    """The updates the next version folds: the first ``K`` that arrived; after the deadline
    (``round_deadline_seconds`` since the last version) whatever waits if at least ``min_quorum``
    (default 1), else the training fails. None when there is nothing to fold."""
    waiting = list(condition.arrived.items())
    if len(waiting) >= condition.buffer_size:
        return dict(waiting[: condition.buffer_size])
    quorum = (training.options or {}).get("min_quorum") or 1
    if condition.expired and len(waiting) >= quorum:
        log.info(
            "training %s: deadline passed, folding %d of %d buffered updates",
            training.id,
            len(waiting),
            condition.buffer_size,
        )
        return dict(waiting)
    if condition.expired:
        await fail(
            session,
            training,
            f"No new global version within the deadline: {len(waiting)} update(s) buffered of "
            f"{condition.buffer_size} (quorum {quorum}).",
        )
    return None


async def _read(session: AsyncSession, digest: str | None, what: str) -> bytes:
    if digest is None:
        raise ModelFileError(f"{what} has no stored bytes.")
    try:
        return await store_for(session).read(digest)
    except BlobNotFound:
        raise ModelFileError(f"{what}: its bytes are missing from the blob store.") from None


async def fold_buffer(
    sessionmaker: async_sessionmaker[AsyncSession],
    model_id: uuid.UUID,
    items: Sequence[tuple[uuid.UUID, int]],
    options: dict[str, Any],
    _previous_state: str | None = None,
) -> tuple[bytes, bytes]:
    """The next global version (TorchScript bytes) and the state to store (safetensors holding
    ``version``) from the claimed updates, each against the version it was trained from (read
    from the model history; at most one decoded copy per distinct base version). An update whose
    base version is no longer kept is left out (logged). The signature of
    :func:`~flplatform.trainings.closing.aggregate_round` less the round (FedBuff keeps no state between
    versions); the current version cannot change while the buffer is claimed."""
    fedbuff = FedBuff.from_options(buffer.fedbuff_options(options))
    async with sessionmaker() as session:
        digest, version = (
            await session.execute(select(Model.weights_digest, Model.round).where(Model.id == model_id))
        ).one()
        template = await _read(session, digest, "The global model")
        store = store_for(session)
    current, _ = await model_files.decode_state_dict_async(template)
    folded: set[str] = set()
    bases: dict[int, StateDict] = {version: current}
    await asyncio.to_thread(fedbuff.begin, current)
    for local_id, sample_size in items:
        async with sessionmaker() as session:
            found = (
                await session.execute(
                    select(LocalModel.round, LocalModel.weights_digest).where(LocalModel.id == local_id)
                )
            ).one_or_none()
            if found is None:
                raise ValueError(f"local model {local_id} disappeared during aggregation")
            base_round, local_digest = found
            base_digest = None
            if base_round not in bases:
                base_digest = await session.scalar(
                    select(GlobalModelRound.weights_digest).where(
                        GlobalModelRound.model_id == model_id, GlobalModelRound.round == base_round
                    )
                )
                if base_digest is None:
                    log.warning(
                        "model %s: version %s (base of update %s) is no longer kept; update left out",
                        model_id,
                        base_round,
                        local_id,
                    )
                    continue
            base_bytes = await _read(session, base_digest, f"Version {base_round}") if base_digest else None
        if base_bytes is not None:
            bases[base_round] = (await model_files.decode_state_dict_async(base_bytes))[0]
            del base_bytes
        if local_digest is None:
            raise ModelFileError(f"Local model {local_id} has no stored bytes.")
        try:
            async with mapped(store, local_digest) as view:  # zero-copy views of the stored update
                await asyncio.to_thread(
                    fedbuff.add,
                    view,
                    bases[base_round],
                    staleness=version - base_round,
                    sample_size=float(sample_size),
                )
                del view  # unmapped with its last reference, before its pages are forgotten below
        except BlobNotFound:
            raise ModelFileError(
                f"Local model {local_id}: its bytes are missing from the blob store."
            ) from None
        folded.add(local_digest)
    new_global = await asyncio.to_thread(fedbuff.finish)
    # read no more (see trainings.closing): their page-cache pages go back to the kernel
    spawn(asyncio.to_thread(store.forget_cached, folded), name=f"forget-buffer-{model_id}")
    encoded = await model_files.rebuild_torchscript(template, new_global)
    state = await asyncio.to_thread(
        encode_safetensors, {"version": torch.tensor(version + 1, dtype=torch.int64)}
    )
    return encoded, state


async def after_fold(
    session: AsyncSession, training: Training, model: GlobalModel, folded: Sequence[uuid.UUID]
) -> None:
    """In the transaction that commits version ``model.round``: mark the folded updates, then
    the next version's update phase (every participant is told, so idle clients train on it)
    or, after ``target_num_updates`` versions, the end."""
    await session.execute(
        update(LocalModel.__table__)  # type: ignore[arg-type]
        .where(LocalModel.__table__.c.id.in_(list(folded)))
        .values(folded_into=model.round)
    )
    await next_or_finish(session, training, model)
