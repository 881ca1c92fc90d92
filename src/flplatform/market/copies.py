"""Model copies: a new global model in the caller's organisation made from one round of another
model's history, and pulls that move a copy to a newer round of its source.

No byte is copied: the copy's rows name the source round's blobs (weights, preprocessing) by
digest, and the blob sweep keeps a blob while any row names it. Who may copy: the source's owner
and whoever may update it (its organisation's admins), or anyone when the seller allows copies
(``billing_model_pricing.copy_allowed``), who then pays ``copy_price`` to the seller. Everyone
pays the price list's ``model_copy`` (``model_copy_update`` for a pull). Charges come first: a
402 leaves nothing written.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.billing.market import charge_model_copy, model_pricing
from flplatform.errors import BadRequest, Conflict, Forbidden, NotFound
from flplatform.orm import GlobalModel, GlobalModelRound, Model, ModelKind, Training
from flplatform.orm.billing import ModelCopy, Operation
from flplatform.orm.user import User
from flplatform.permissions import Requester, can_read, can_update


@dataclass
class CopyResult:
    model: GlobalModel
    link: ModelCopy
    operations: list[Operation]


async def _copyable_source(session: AsyncSession, caller: User, model_id: uuid.UUID) -> GlobalModel:
    """The source if the caller may copy it: 404 when they can neither read it nor buy a copy,
    403 when they read it but may not copy it, 400 for a model that is not a plain global one."""
    model = await session.get(Model, model_id)
    pricing = await model_pricing(session, model_id)
    requester = await Requester.load(session, caller)
    if model is None:
        raise NotFound(f"Model {model_id} not found.")
    for_sale = pricing is not None and pricing.copy_allowed
    if not for_sale and not await can_update(requester, model):
        if await can_read(requester, model):
            raise Forbidden(
                "Only the model's owner and its organisation's admins may copy it (it is not for sale)."
            )
        raise NotFound(f"Model {model_id} not found.")
    if not isinstance(model, GlobalModel) or model.kind != ModelKind.GLOBAL.value:
        raise BadRequest(
            "Only global models can be copied (not local, mean or SWAG ones).", code="not_copyable"
        )
    return model


async def _round(session: AsyncSession, source: GlobalModel, number: int | None) -> GlobalModelRound:
    number = source.round if number is None else number
    row = (
        await session.execute(
            select(GlobalModelRound).where(
                GlobalModelRound.model_id == source.id, GlobalModelRound.round == number
            )
        )
    ).scalar_one_or_none()
    if row is None and number == source.round and source.weights_digest is not None:
        # A model without a history row (written before the history existed): its current weights.
        return GlobalModelRound(
            model_id=source.id,
            round=number,
            weights_digest=source.weights_digest,
            weights_format=source.weights_format,
            weights_size=source.weights_size,
        )
    if row is None or row.weights_digest is None:
        raise NotFound(f"Model {source.id} has no stored round {number}.")
    return row


async def copy_model(
    session: AsyncSession,
    caller: User,
    source_id: uuid.UUID,
    *,
    round: int | None,
    name: str | None,
    key: str,
) -> CopyResult:
    """Copy round ``round`` (default: the latest) of the source into a new global model owned by
    the caller, in their organisation; charged ``model_copy`` under ``key``."""
    source = await _copyable_source(session, caller, source_id)
    history = await _round(session, source, round)
    operations = await charge_model_copy(session, caller, source, key=key, round=history.round)
    copy = GlobalModel(
        owner_id=caller.id,
        organization_id=caller.organization_id,
        round=0,
        name=name or f"{source.name} (copy)"[:200],
        description=source.description,
        input_shape=source.input_shape,
        weights_digest=history.weights_digest,
        weights_format=history.weights_format,
        weights_size=history.weights_size,
        preprocessing_digest=source.preprocessing_digest,
        has_preprocessing=source.has_preprocessing,
    )
    session.add(copy)
    await session.flush()
    link = ModelCopy(model_id=copy.id, source_model_id=source.id, source_round=history.round)
    session.add_all(
        [
            link,
            GlobalModelRound(
                model_id=copy.id,
                round=0,
                weights_digest=history.weights_digest,
                weights_format=history.weights_format,
                weights_size=history.weights_size,
            ),
        ]
    )
    await session.flush()
    return CopyResult(copy, link, operations)


async def pull_copy(
    session: AsyncSession, caller: User, copy_id: uuid.UUID, *, round: int | None
) -> CopyResult:
    """Move a copy the caller may update to a newer round of its source (default: the latest),
    as the copy's next round; charged ``model_copy_update``, once per copy and source round.
    409 when the copy is up to date or backs a training."""
    copy = await session.get(Model, copy_id)
    link = await session.get(ModelCopy, copy_id)
    requester = await Requester.load(session, caller)
    if copy is None or not await can_read(requester, copy):
        raise NotFound(f"Model {copy_id} not found.")
    if not await can_update(requester, copy):
        raise Forbidden("Only the copy's owner and its organisation's admins may update it.")
    if link is None or not isinstance(copy, GlobalModel):
        raise BadRequest(f"Model {copy_id} is not a copy of another model.", code="not_a_copy")
    source = await _copyable_source(session, caller, link.source_model_id)
    history = await _round(session, source, round)
    if history.round <= link.source_round:
        raise Conflict(
            f"The copy holds round {link.source_round} of its source; round {history.round} is not newer.",
            code="copy_up_to_date",
        )
    if (await session.execute(select(Training.id).where(Training.model_id == copy.id).limit(1))).first():
        raise Conflict("The copy backs a training; copy the source again instead.", code="copy_in_training")
    operations = await charge_model_copy(
        session,
        caller,
        source,
        key=f"copy-update:{copy.id}:{history.round}",
        update=True,
        round=history.round,
    )
    copy.round += 1
    copy.weights_digest, copy.weights_format, copy.weights_size = (
        history.weights_digest,
        history.weights_format,
        history.weights_size,
    )
    link.source_round = history.round
    session.add(
        GlobalModelRound(
            model_id=copy.id,
            round=copy.round,
            weights_digest=history.weights_digest,
            weights_format=history.weights_format,
            weights_size=history.weights_size,
        )
    )
    await session.flush()
    return CopyResult(copy, link, operations)
