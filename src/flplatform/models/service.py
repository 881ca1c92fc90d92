"""Models: upload, describe, list, download (any round), delete, metrics, preprocessing, SWAG
moments.

Permissions come from ``flplatform.permissions`` (``MODEL_POLICY``/``METRIC_POLICY``, see
``permissions/resources.py``): reads and lists filter with the policy; single models reach the
routes through the dependencies of :mod:`flplatform.models.dependencies`. What participants
upload during a training (updates, test metrics, SWAG statistics) follows the round rules of
:mod:`flplatform.trainings.contributions`; this module imports nothing from ``trainings``.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from flplatform.blobs import BlobInfo, BlobNotFound, store_for
from flplatform.blobs.multipart import FilePart
from flplatform.errors import BadRequest, Conflict, Forbidden, NotFound
from flplatform.kit.metrics import observe_upload, stopwatch
from flplatform.kit.pagination import paginate
from flplatform.models import archive_weights, layouts, uploads
from flplatform.models import files as model_files
from flplatform.models.files import ModelFileError, TensorSpec
from flplatform.models.schemas import MetricRead, ModelRead, ModelType
from flplatform.models.uploads import UploadedFile
from flplatform.orm import (
    GlobalModel,
    GlobalModelRound,
    LocalModel,
    MeanModel,
    Metric,
    Model,
    SWAGModel,
    Training,
)
from flplatform.orm.model import mean_model_members
from flplatform.orm.training import ACTIVE_STATES
from flplatform.permissions import Requester, can_read, can_update, ensure_visible, readable
from flplatform.permissions.resources import refusal


def file_error(exc: Exception) -> BadRequest:
    return BadRequest(str(exc), code="invalid_model_file")


# Built once: every request naming a model (each client update among them) reads it by id.
_MODEL_BY_ID = select(Model).where(Model.id == bindparam("model_id"))


async def get_model(session: AsyncSession, model_id: uuid.UUID) -> Model:
    model = (await session.execute(_MODEL_BY_ID, {"model_id": model_id})).scalar_one_or_none()
    if model is None:
        raise NotFound(f"Model {model_id} not found.")
    return model


def model_type(model: Model) -> ModelType:
    if isinstance(model, MeanModel):
        return "MEAN"
    if isinstance(model, SWAGModel):
        return "SWAG"
    if isinstance(model, GlobalModel):
        return "GLOBAL"
    return "LOCAL"


def global_id_of(model: Model) -> uuid.UUID:
    return model.base_model_id if isinstance(model, LocalModel) else model.id


NOT_YOURS = "You are neither the owner of the model nor a member of its training."


async def readable_model(requester: Requester, model_id: uuid.UUID) -> Model:
    """The model if the caller may read it; 404 otherwise (403 inside the DLR space)."""
    model = (await requester.session.execute(_MODEL_BY_ID, {"model_id": model_id})).scalar_one_or_none()
    await ensure_visible(requester, model, f"Model {model_id}", NOT_YOURS)
    assert model is not None
    return model


async def list_models(requester: Requester, *, limit: int, offset: int) -> tuple[list[Model], int]:
    """A page of the models the caller may read (the policy's SQL clause), oldest first; the total."""
    stmt, order = select(Model).where(readable(requester, Model)), (Model.created_at, Model.id)
    return await paginate(requester.session, stmt, order_by=order, limit=limit, offset=offset)


async def describe(session: AsyncSession, model: Model) -> ModelRead:
    return (await describe_many(session, [model]))[0]


async def describe_many(session: AsyncSession, models: Sequence[Model]) -> list[ModelRead]:
    """Descriptions of many models in a fixed number of statements (at most four, whatever the
    number of models): list endpoints must not issue one query per row."""
    global_ids = [m.id for m in models if isinstance(m, GlobalModel)]
    trainings: dict[uuid.UUID, uuid.UUID] = {}
    rounds: dict[uuid.UUID, list[int]] = {}
    if global_ids:
        of_models = select(Training.model_id, Training.id).where(Training.model_id.in_(global_ids))
        trainings = dict((await session.execute(of_models)).all())
        for model_id, round_ in await session.execute(
            select(GlobalModelRound.model_id, GlobalModelRound.round)
            .where(GlobalModelRound.model_id.in_(global_ids))
            .order_by(GlobalModelRound.round)
        ):
            rounds.setdefault(model_id, []).append(round_)
    swag_ids = [m.id for m in models if isinstance(m, SWAGModel)]
    has_moments: dict[uuid.UUID, bool] = {}
    if swag_ids:
        has_moments = {
            i: bool(h)
            for i, h in await session.execute(
                select(SWAGModel.id, SWAGModel.swag_first_digest.isnot(None)).where(
                    SWAGModel.id.in_(swag_ids)
                )
            )
        }
    mean_ids = [m.id for m in models if isinstance(m, MeanModel)]
    members: dict[uuid.UUID, list[uuid.UUID]] = {}
    if mean_ids:
        for mean_id, member_id in await session.execute(
            select(mean_model_members.c.mean_model_id, mean_model_members.c.member_id).where(
                mean_model_members.c.mean_model_id.in_(mean_ids)
            )
        ):
            members.setdefault(mean_id, []).append(member_id)
    out = []
    for model in models:
        item = ModelRead(
            id=model.id,
            type=model_type(model),
            owner=model.owner_id,
            round=model.round,
            created_at=model.created_at,
            weights_format=model.weights_format,
            weights_size=model.weights_size,
        )
        if isinstance(model, GlobalModel):
            item.name, item.description = model.name, model.description
            item.input_shape, item.has_preprocessing = model.input_shape, model.has_preprocessing
            item.training = trainings.get(model.id)
            item.rounds = rounds.get(model.id, [])
        if isinstance(model, SWAGModel):
            item.has_swag_moments = has_moments.get(model.id, False)
        if isinstance(model, MeanModel):
            item.models = members.get(model.id, [])
        if isinstance(model, LocalModel):
            item.base_model, item.sample_size = model.base_model_id, model.sample_size
        out.append(item)
    return out


# --------------------------------------------------------------------------- global models


@dataclass
class GlobalUpload:
    name: str
    description: str
    type: str  # GLOBAL | SWAG | MEAN
    round: int
    input_shape: list[int | None] | None
    model_file: UploadedFile | None
    preprocessing_file: UploadedFile | None
    members: list[uuid.UUID]


async def _check_preprocessing(data: UploadedFile) -> None:
    try:
        await uploads.check_module(data, kind="preprocessing")
    except ModelFileError as exc:
        raise ModelFileError(f"Invalid preprocessing file: {exc}") from None


async def _build_mean_module(members: list[bytes]) -> bytes:
    """A TorchScript module averaging the members' outputs (what MEAN models download as),
    scripted in the model sandbox from the members' archives."""
    from flplatform.sandbox import client

    return await model_files.sandboxed(client.mean_module(members))


async def create_global_model(requester: Requester, upload: GlobalUpload) -> GlobalModel:
    """The caller's new global model (in their organisation, see ``orm.model._fill_tenant``)."""
    session, owner = requester.session, requester.user
    assert owner is not None
    elapsed = stopwatch()
    try:
        if upload.preprocessing_file is not None:
            await _check_preprocessing(upload.preprocessing_file)
        weights: UploadedFile | None = upload.model_file
        checked: tuple[dict[str, TensorSpec], archive_weights.Plan | None] | None = None
        if upload.type == "MEAN":
            if not upload.members:
                raise BadRequest("A MEAN model needs `models`: the ids of its member global models.")
            members: list[GlobalModel] = []
            for member_id in dict.fromkeys(upload.members):
                member = await get_model(session, member_id)
                if not isinstance(member, GlobalModel) or isinstance(member, MeanModel):
                    raise BadRequest(f"Model {member_id} is not a global model.")
                if not await can_read(requester, member):
                    raise refusal(
                        requester,
                        member.organization_id,
                        f"Model {member_id}",
                        f"You may not read model {member_id}.",
                    )
                members.append(member)
            blobs = [await _current_weights(session, m.id) for m in members]
            weights = await _build_mean_module(blobs)
        else:
            if weights is None:
                raise BadRequest("No uploaded file 'model_file' found.", code="missing_file")
            checked = await uploads.check_global_model(weights)
    except ModelFileError as exc:
        raise file_error(exc) from None
    stored = await put_blob(session, weights)
    if checked is not None and stored is not None:  # nothing decodes this model again for them
        await layouts.record(session, stored.digest, checked[0], plan=checked[1])
    preprocessing = await put_blob(session, upload.preprocessing_file)
    cls = {"GLOBAL": GlobalModel, "SWAG": SWAGModel, "MEAN": MeanModel}[upload.type]
    model = cls(
        owner_id=owner.id,
        round=upload.round,
        name=upload.name,
        description=upload.description,
        input_shape=upload.input_shape,
        weights_digest=stored.digest if stored else None,
        weights_format="torchscript",
        weights_size=stored.size if stored else 0,
        preprocessing_digest=preprocessing.digest if preprocessing else None,
        has_preprocessing=preprocessing is not None,
    )
    if isinstance(model, MeanModel):
        model.members = members
    session.add(model)
    await session.flush()
    session.add(
        GlobalModelRound(
            model_id=model.id,
            round=model.round,
            weights_digest=model.weights_digest,
            weights_format="torchscript",
            weights_size=model.weights_size,
        )
    )
    await session.flush()
    size = uploads.uploaded_size(upload.model_file) + uploads.uploaded_size(upload.preprocessing_file)
    observe_upload("global", size, elapsed())
    return model


async def clone_global_model(session: AsyncSession, model: GlobalModel) -> GlobalModel:
    """A model can back one training; a second training on it gets a copy (as the reference)."""
    cls = type(model)
    clone = cls(
        owner_id=model.owner_id,
        round=model.round,
        name=model.name,
        description=model.description,
        input_shape=model.input_shape,
        weights_digest=model.weights_digest,
        weights_format=model.weights_format,
        weights_size=model.weights_size,
        preprocessing_digest=model.preprocessing_digest,
        has_preprocessing=model.has_preprocessing,
    )
    session.add(clone)
    await session.flush()
    session.add(
        GlobalModelRound(
            model_id=clone.id,
            round=clone.round,
            weights_digest=model.weights_digest,
            weights_format=model.weights_format,
            weights_size=model.weights_size,
        )
    )
    await session.flush()
    return clone


async def put_blob(session: AsyncSession, data: UploadedFile | None) -> BlobInfo | None:
    """Store ``data`` in the session's blob store (None stays None): digest and size. A streamed
    part (already in the store's spool, checked) is published as it is."""
    if data is None:
        return None
    if isinstance(data, FilePart):
        return await data.commit()
    return await store_for(session).put(data)


async def read_blob(session: AsyncSession, digest: str | None, what: str) -> bytes:
    """The bytes of a blob a row names; 404 when the row names none or the blob is gone."""
    if digest is None:
        raise NotFound(f"{what} has no stored bytes.")
    try:
        return await store_for(session).read(digest)
    except BlobNotFound:
        raise NotFound(f"{what}: its stored bytes are missing from the blob store.") from None


async def _current_weights(session: AsyncSession, model_id: uuid.UUID) -> bytes:
    digest = (
        await session.execute(select(Model.weights_digest).where(Model.id == model_id))
    ).scalar_one_or_none()
    if digest is None:
        raise NotFound(f"Model {model_id} has no stored weights.")
    return await read_blob(session, digest, f"Model {model_id}")


async def download_digest(session: AsyncSession, model: Model, round_: int | None) -> str | None:
    """The blob a download sends as it is stored (streamed, with its digest as ETag); None when
    the bytes are built per request (a local update stored as safetensors: see ``download``)."""
    if isinstance(model, GlobalModel) and round_ is not None and round_ != model.round:
        digest = (
            await session.execute(
                select(GlobalModelRound.weights_digest)
                .where(GlobalModelRound.model_id == model.id, GlobalModelRound.round <= round_)
                .order_by(GlobalModelRound.round.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if digest is None or round_ > model.round:
            raise NotFound(f"Model {model.id} has no weights for round {round_}.")
        return digest
    if isinstance(model, LocalModel) and model.weights_format != "torchscript":
        return None
    if model.weights_digest is None:
        raise NotFound(f"Model {model.id} has no stored weights.")
    return model.weights_digest


async def download(session: AsyncSession, model: Model, round_: int | None) -> bytes:
    """TorchScript bytes of the model; ``round_`` selects a global model's history entry."""
    if isinstance(model, GlobalModel):
        if round_ is None or round_ == model.round:
            return await _current_weights(session, model.id)
        row = (
            await session.execute(
                select(GlobalModelRound.weights_digest)
                .where(GlobalModelRound.model_id == model.id, GlobalModelRound.round <= round_)
                .order_by(GlobalModelRound.round.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if row is None or round_ > model.round:
            raise NotFound(f"Model {model.id} has no weights for round {round_}.")
        return await read_blob(session, row, f"Round {round_} of model {model.id}")
    assert isinstance(model, LocalModel)
    data = await _current_weights(session, model.id)
    if model.weights_format == "torchscript":
        return data
    # Local updates are stored as safetensors; FedDC clients download them as TorchScript.
    template = await _current_weights(session, model.base_model_id)
    state = await asyncio.to_thread(model_files.decode_safetensors, data)
    try:
        return await model_files.rebuild_torchscript(template, state)
    except ModelFileError as exc:
        raise file_error(exc) from None


async def delete_model(session: AsyncSession, model: Model) -> None:
    """Delete a model the caller may delete (``models.dependencies.DeletableModel``). Deleting a
    global model deletes its training; one that backs a running training is refused (409)."""
    if isinstance(model, GlobalModel):
        running = (
            await session.execute(
                select(Training.id).where(Training.model_id == model.id, Training.state.in_(ACTIVE_STATES))
            )
        ).first()
        if running is not None:
            raise Conflict("The model backs a running training; stop the training first.")
    await session.delete(model)
    await session.flush()


@dataclass(frozen=True)
class MetricFilter:
    key: str | None = None
    step: int | None = None
    reporter: uuid.UUID | None = None


async def list_metrics(
    requester: Requester, model: Model, wanted: MetricFilter, *, limit: int, offset: int
) -> tuple[list[MetricRead], int]:
    """One page of the model's metrics (oldest first) filtered by the metric policy's clause and
    ``wanted``, with the total."""
    statement = (
        select(Metric)
        .options(undefer(Metric.value_binary))
        .where(Metric.model_id == model.id, readable(requester, Metric))
    )
    if wanted.key is not None:
        statement = statement.where(Metric.key == wanted.key)
    if wanted.step is not None:
        statement = statement.where(Metric.step == wanted.step)
    if wanted.reporter is not None:
        statement = statement.where(Metric.reporter_id == wanted.reporter)
    rows, total = await paginate(
        requester.session, statement, order_by=[Metric.created_at, Metric.id], limit=limit, offset=offset
    )
    return [
        MetricRead(
            id=m.id,
            identifier=m.identifier,
            key=m.key,
            value_float=m.value_float,
            value_binary=base64.b64encode(m.value_binary).decode() if m.value_binary is not None else None,
            step=m.step,
            model=m.model_id,
            reporter=m.reporter_id,
            created_at=m.created_at,
        )
        for m in rows
    ], total


# --------------------------------------------------------------------------- preprocessing


async def preprocessing_digest(session: AsyncSession, model: Model) -> str:
    global_id = global_id_of(model)
    digest = (
        await session.execute(select(GlobalModel.preprocessing_digest).where(GlobalModel.id == global_id))
    ).scalar_one_or_none()
    if digest is None:
        raise NotFound(f"Model '{model.id}' has no preprocessing model defined.")
    return digest


async def get_preprocessing(session: AsyncSession, model: Model) -> bytes:
    global_id = global_id_of(model)
    digest = (
        await session.execute(select(GlobalModel.preprocessing_digest).where(GlobalModel.id == global_id))
    ).scalar_one_or_none()
    if digest is None:
        raise NotFound(f"Model '{model.id}' has no preprocessing model defined.")
    return await read_blob(session, digest, f"The preprocessing module of model {model.id}")


async def ensure_may_set_preprocessing(requester: Requester, model: Model) -> None:
    """Only a global model's owner sets its preprocessing module (checked before the upload)."""
    if not isinstance(model, GlobalModel):
        raise BadRequest("Preprocessing modules belong to global models.")
    if not await can_update(requester, model):
        raise Forbidden(f"You are not the owner of model {model.id}!")


async def set_preprocessing(requester: Requester, model: Model, data: UploadedFile) -> None:
    session = requester.session
    await ensure_may_set_preprocessing(requester, model)
    assert isinstance(model, GlobalModel)
    try:
        await _check_preprocessing(data)
    except ModelFileError as exc:
        raise file_error(exc) from None
    stored = await put_blob(session, data)
    assert stored is not None
    await session.execute(
        update(GlobalModel)
        .where(GlobalModel.id == model.id)
        .values(preprocessing_digest=stored.digest, has_preprocessing=True)
    )
    model.has_preprocessing = True
    model.preprocessing_digest = stored.digest


# --------------------------------------------------------------------------- SWAG


async def swag_moment_digest(session: AsyncSession, model: SWAGModel, moment: str) -> str:
    column = SWAGModel.swag_first_digest if moment == "first" else SWAGModel.swag_second_digest
    digest = (await session.execute(select(column).where(SWAGModel.id == model.id))).scalar_one_or_none()
    if digest is None:
        raise NotFound(f"SWAG model {model.id} has no aggregated moments yet.")
    return digest


async def swag_moments(session: AsyncSession, model: SWAGModel) -> tuple[bytes | None, bytes | None]:
    """The aggregated moments (safetensors, key ``moment``) — what inference samples from."""
    first, second = (
        await session.execute(
            select(SWAGModel.swag_first_digest, SWAGModel.swag_second_digest).where(SWAGModel.id == model.id)
        )
    ).one()
    what = f"The SWAG moments of model {model.id}"
    return (
        None if first is None else await read_blob(session, first, what),
        None if second is None else await read_blob(session, second, what),
    )
