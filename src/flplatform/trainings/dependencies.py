"""Permission checks on one training, as FastAPI dependencies (Polar's ``auth.py`` style): a
route that takes ``training: ReadableTraining`` or ``training: ManagedTraining`` receives the
``{training_id}`` path's training already authorised.

Trainings the caller may not see are 404 (403 between users of the organisation-less DLR space,
as the reference answered); visible trainings the caller may not manage are 403. The rules are
the training policy's (``permissions/resources.py``): the actor, the participants and the
organisation's role holders read; the actor and the organisation's admins manage.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.errors import Forbidden
from flplatform.orm import Training
from flplatform.permissions import Requester, can_update, ensure_visible
from flplatform.trainings.repository import get_training

NOT_A_MEMBER = "You are neither the actor nor a participant of this training."


async def _visible(requester: Requester, training_id: uuid.UUID, *, lock: bool) -> Training:
    training = await get_training(requester.session, training_id, lock=lock)
    await ensure_visible(requester, training, f"Training {training_id}", NOT_A_MEMBER)
    return training


async def readable_training(requester: AuthenticatedRequester, training_id: uuid.UUID) -> Training:
    """The training if the caller may read it."""
    return await _visible(requester, training_id, lock=False)


async def managed_training(requester: AuthenticatedRequester, training_id: uuid.UUID) -> Training:
    """The training, row-locked, if the caller may manage it (404 invisible, 403 visible only)."""
    training = await _visible(requester, training_id, lock=True)
    if not await can_update(requester, training):
        raise Forbidden("Only the training's actor (or an organisation admin) may do this.")
    return training


ReadableTraining = Annotated[Training, Depends(readable_training)]
ManagedTraining = Annotated[Training, Depends(managed_training)]
