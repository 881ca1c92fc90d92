"""The inference routes' permission checks as FastAPI dependencies: a model the caller may read
(the model policy, 404 otherwise) and an inference job the caller submitted (404 otherwise).

``POST /api/inference/`` names its model in the body, which the route parses itself (JSON or
multipart, with size limits): that check stays in :func:`~flplatform.inference.service.check_inference`,
which also admits the inference market's public models."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from flplatform.auth.dependencies import CurrentUser
from flplatform.db import SessionDep
from flplatform.errors import NotFound
from flplatform.inference import jobs
from flplatform.inference.service import get_readable_model
from flplatform.orm import Model
from flplatform.orm.workqueue import QueuedWork


async def readable_model(session: SessionDep, user: CurrentUser, model_id: uuid.UUID) -> Model:
    """A model the caller may read, or one published on the market (its buyers need its metadata
    to call it); 404 otherwise."""
    try:
        return await get_readable_model(session, user, model_id)
    except NotFound:
        from flplatform.billing import is_public_for_inference  # billing imports no inference code

        model = await session.get(Model, model_id)
        if model is None or not await is_public_for_inference(session, model_id):
            raise
        return model


ReadableModel = Annotated[Model, Depends(readable_model)]


async def submitted_job(session: SessionDep, user: CurrentUser, job_id: uuid.UUID) -> QueuedWork:
    return await jobs.get_job(session, user, job_id)


SubmittedJob = Annotated[QueuedWork, Depends(submitted_job)]
