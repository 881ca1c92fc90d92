"""Loading trainings and their global models: the queries every part of the trainings domain
shares (service, phase machine, runtime, contributions), kept apart so none imports another."""

from __future__ import annotations

import uuid

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import NotFound
from flplatform.orm import GlobalModel, Model, Training


def _training_query(training_id: uuid.UUID) -> Select[Training]:
    return select(Training).where(Training.id == training_id)


async def get_training(
    session: AsyncSession, training_id: uuid.UUID, *, lock: bool = False, share: bool = False
) -> Training:
    """The training, fresh from the database (``lock``: ``FOR UPDATE``; ``share``: ``FOR SHARE``);
    404 when it does not exist. Its participants are not loaded (``Training.participants`` raises):
    read them by query with :mod:`flplatform.trainings.participants`, whose cost does not grow
    with the fleet where a step needs only a few of them."""
    stmt = _training_query(training_id).execution_options(populate_existing=True)
    if lock:
        stmt = stmt.with_for_update(of=Training)
    elif share:
        stmt = stmt.with_for_update(read=True, of=Training)
    training = (await session.execute(stmt)).scalar_one_or_none()
    if training is None:
        raise NotFound(f"Training {training_id} not found.")
    return training


async def training_for_model(
    session: AsyncSession, model_id: uuid.UUID, *, share: bool = False
) -> Training | None:
    """The training a global model backs, if any (a model backs at most one)."""
    training_id = (
        await session.execute(select(Training.id).where(Training.model_id == model_id))
    ).scalar_one_or_none()
    if training_id is None:
        return None
    return await get_training(session, training_id, share=share)


async def global_model(session: AsyncSession, model_id: uuid.UUID) -> GlobalModel:
    model = (
        await session.execute(
            select(Model).where(Model.id == model_id).execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if not isinstance(model, GlobalModel):
        raise NotFound(f"Global model {model_id} not found.")
    return model
