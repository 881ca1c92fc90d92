"""The buffer of an asynchronous (FedBuff) training: whether a training is asynchronous, the
updates waiting to be folded, and the rules for an upload's base version.

A low-level module (the ORM, errors and the aggregation options only) so that the round rules
(:mod:`~flplatform.trainings.rounds`) and the upload rules
(:mod:`~flplatform.trainings.contributions`) can ask it; the fold and what follows it are in
:mod:`~flplatform.trainings.asynchronous`.

In an asynchronous training a local model's ``round`` is the global version it was trained
from (the wire contract's ``round`` field), and ``folded_into`` the version it went into (null
while it waits in the buffer).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.aggregation import parse_fedbuff_options
from flplatform.errors import BadRequest, Conflict
from flplatform.orm import GlobalModel, GlobalModelRound, LocalModel, Training

MODE_ASYNC = "async"


def is_async(options: Mapping[str, Any] | None) -> bool:
    """Whether a training with these options runs asynchronous (FedBuff) rounds."""
    return (options or {}).get("mode") == MODE_ASYNC


def fedbuff_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options.fedbuff`` with every default filled in."""
    return parse_fedbuff_options((options or {}).get("fedbuff"))


async def pending(
    session: AsyncSession, model_id: uuid.UUID, among: set[uuid.UUID] | None = None
) -> dict[uuid.UUID, tuple[uuid.UUID, int]]:
    """The updates waiting in the buffer, oldest first: local model id → (local model id, sample
    size); only those of ``among`` (the current participants) when given."""
    rows = await session.execute(
        select(LocalModel.id, LocalModel.owner_id, LocalModel.sample_size)
        .where(LocalModel.base_model_id == model_id, LocalModel.folded_into.is_(None))
        .order_by(LocalModel.created_at, LocalModel.id)
    )
    return {local_id: (local_id, size) for local_id, owner, size in rows if among is None or owner in among}


async def check_base(session: AsyncSession, training: Training, glob: GlobalModel, base_round: int) -> None:
    """An upload names the version it was trained from: not a future one, not one before the
    training started, not staler than ``max_staleness``, and one the model history still holds
    (its delta is taken against it)."""
    if base_round > glob.round or base_round < training.start_round:
        raise BadRequest(
            f"Training {training.id} has no global version {base_round} to train from "
            f"(versions {training.start_round} to {glob.round}).",
            code="wrong_round",
        )
    limit = fedbuff_options(training.options)["max_staleness"]
    if limit is not None and glob.round - base_round > limit:
        raise BadRequest(
            f"An update from version {base_round} is {glob.round - base_round} versions old; training "
            f"{training.id} takes updates at most {limit} versions old. Train on version {glob.round}.",
            code="too_stale",
        )
    if base_round == glob.round:
        return
    kept = await session.scalar(
        select(exists().where(GlobalModelRound.model_id == glob.id, GlobalModelRound.round == base_round))
    )
    if not kept:
        raise BadRequest(
            f"Version {base_round} of the global model is no longer kept; train on version {glob.round}.",
            code="too_stale",
        )


def check_replace(folded_into: int | None, base_round: int, training: Training) -> None:
    """A re-upload from the same version (``base_round``) replaces the waiting update (folded into
    the version ``folded_into``, if it was), unless it was folded already or the buffer is being
    folded right now (it may be in it)."""
    if folded_into is not None:
        raise Conflict(
            f"Your update from version {base_round} was folded into version {folded_into}; "
            "train on the newest version.",
            code="already_folded",
        )
    if training.locked:
        raise Conflict(
            f"The buffer of training {training.id} is being folded; upload again in a moment.",
            code="round_locked",
        )
