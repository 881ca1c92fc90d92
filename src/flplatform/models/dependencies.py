"""Permission checks on one model, as FastAPI dependencies (Polar's ``auth.py`` style): a route
that takes ``model: ReadableModel`` (or ``VisibleModel``, ``DeletableModel``) receives the
``{model_id}`` path's model already checked.

* ``ReadableModel``: the caller may read it; 404 otherwise (403 inside the organisation-less
  DLR space, as the reference answered).
* ``VisibleModel``: what a write addresses — 404 when the caller cannot see it; inside the DLR
  space the write's own rule (owner, participant) answers 403, as the reference did.
* ``DeletableModel``: visible, and the caller may delete it (owner, the organisation's admins
  or the training's actor); 403 otherwise.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from flplatform.auth.dependencies import AuthenticatedRequester
from flplatform.errors import Forbidden
from flplatform.models import service as model_service
from flplatform.orm import Model
from flplatform.permissions import can_delete, ensure_visible


async def readable_model(requester: AuthenticatedRequester, model_id: uuid.UUID) -> Model:
    return await model_service.readable_model(requester, model_id)


async def visible_model(requester: AuthenticatedRequester, model_id: uuid.UUID) -> Model:
    model = await model_service.get_model(requester.session, model_id)
    await ensure_visible(requester, model, f"Model {model_id}", None)
    return model


async def deletable_model(requester: AuthenticatedRequester, model_id: uuid.UUID) -> Model:
    model = await visible_model(requester, model_id)
    if not await can_delete(requester, model):
        raise Forbidden("You are neither the owner of the model nor the actor of the corresponding training.")
    return model


ReadableModel = Annotated[Model, Depends(readable_model)]
VisibleModel = Annotated[Model, Depends(visible_model)]
DeletableModel = Annotated[Model, Depends(deletable_model)]
