"""Models: upload, download (any round), client updates, metrics, preprocessing, SWAG moments.

Permissions come from ``flplatform.permissions`` (``MODEL_POLICY``/``METRIC_POLICY``, see
``permissions/resources.py``): reads and lists filter with the policy; updates, SWAG statistics
and test metrics additionally come from the training's participants only (the state machine's
rule, not a permission).
"""

from __future__ import annotations

import asyncio
import base64
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from flplatform.errors import BadRequest, Conflict, Forbidden, NotFound
from flplatform.models import files as model_files
from flplatform.models.files import ModelFileError
from flplatform.models.schemas import MetricRead, ModelRead
from flplatform.orm import (
    GlobalModel,
    GlobalModelRound,
    LocalModel,
    MeanModel,
    Metric,
    Model,
    SWAGModel,
    SwagStatistic,
    Training,
    TrainingState,
    User,
)
from flplatform.orm.base import utcnow
from flplatform.orm.model import mean_model_members
from flplatform.permissions import Requester, can_delete, can_read, can_update, ensure_visible, readable
from flplatform.permissions.resources import refusal
from flplatform.trainings import aggregate
from flplatform.trainings import service as training_service

MAX_METRIC_KEY = 128


def file_error(exc: Exception) -> BadRequest:
    return BadRequest(str(exc), code="invalid_model_file")


async def get_model(session: AsyncSession, model_id: uuid.UUID) -> Model:
    model = (await session.execute(select(Model).where(Model.id == model_id))).scalar_one_or_none()
    if model is None:
        raise NotFound(f"Model {model_id} not found.")
    return model


def model_type(model: Model) -> str:
    if isinstance(model, MeanModel):
        return "MEAN"
    if isinstance(model, SWAGModel):
        return "SWAG"
    if isinstance(model, GlobalModel):
        return "GLOBAL"
    return "LOCAL"


def _global_id(model: Model) -> uuid.UUID:
    return model.base_model_id if isinstance(model, LocalModel) else model.id


NOT_YOURS = "You are neither the owner of the model nor a member of its training."


async def readable_model(requester: Requester, model_id: uuid.UUID) -> Model:
    """The model if the caller may read it; 404 otherwise (403 inside the DLR space)."""
    model = (await requester.session.execute(select(Model).where(Model.id == model_id))).scalar_one_or_none()
    await ensure_visible(requester, model, f"Model {model_id}", NOT_YOURS)
    assert model is not None
    return model


async def list_models(requester: Requester) -> Sequence[Model]:
    """Every model the caller may read (the policy's SQL clause; one statement)."""
    stmt = select(Model).where(readable(requester, Model)).order_by(Model.created_at, Model.id)
    return (await requester.session.execute(stmt)).scalars().all()


async def describe(session: AsyncSession, model: Model) -> ModelRead:
    return (await describe_many(session, [model]))[0]


async def describe_many(session: AsyncSession, models: Sequence[Model]) -> list[ModelRead]:
    """Descriptions of many models in a fixed number of statements (at most four, whatever the
    number of models): list endpoints must not issue one query per row."""
    global_ids = [m.id for m in models if isinstance(m, GlobalModel)]
    trainings: dict[uuid.UUID, uuid.UUID] = {}
    rounds: dict[uuid.UUID, list[int]] = {}
    if global_ids:
        trainings = dict(
            (
                await session.execute(
                    select(Training.model_id, Training.id).where(Training.model_id.in_(global_ids))
                )
            ).all()
        )
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
                select(SWAGModel.id, SWAGModel.swag_first_moment.isnot(None)).where(
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
    model_file: bytes | None
    preprocessing_file: bytes | None
    members: list[uuid.UUID]


async def _check_preprocessing(data: bytes) -> None:
    try:
        await model_files.check_torchscript(data, kind="preprocessing")
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
    try:
        if upload.preprocessing_file is not None:
            await _check_preprocessing(upload.preprocessing_file)
        weights: bytes | None = upload.model_file
        if upload.type == "MEAN":
            if not upload.members:
                raise BadRequest("A MEAN model needs `models`: the ids of its member global models.")
            members = []
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
            await model_files.check_torchscript(weights)
    except ModelFileError as exc:
        raise file_error(exc) from None
    cls = {"GLOBAL": GlobalModel, "SWAG": SWAGModel, "MEAN": MeanModel}[upload.type]
    model = cls(
        owner_id=owner.id,
        round=upload.round,
        name=upload.name,
        description=upload.description,
        input_shape=upload.input_shape,
        weights=weights,
        weights_format="torchscript",
        weights_size=len(weights or b""),
        preprocessing=upload.preprocessing_file,
        has_preprocessing=upload.preprocessing_file is not None,
    )
    if upload.type == "MEAN":
        model.members = members  # type: ignore[attr-defined]
    session.add(model)
    await session.flush()
    session.add(
        GlobalModelRound(
            model_id=model.id,
            round=model.round,
            weights=weights,
            weights_format="torchscript",
            weights_size=len(weights or b""),
        )
    )
    await session.flush()
    return model


async def clone_global_model(session: AsyncSession, model: GlobalModel) -> GlobalModel:
    """A model can back one training; a second training on it gets a copy (as the reference)."""
    row = (
        await session.execute(
            select(Model.weights, GlobalModel.preprocessing)
            .select_from(GlobalModel)
            .where(GlobalModel.id == model.id)
        )
    ).one()
    cls = type(model)
    clone = cls(
        owner_id=model.owner_id,
        round=model.round,
        name=model.name,
        description=model.description,
        input_shape=model.input_shape,
        weights=row[0],
        weights_format=model.weights_format,
        weights_size=model.weights_size,
        preprocessing=row[1],
        has_preprocessing=model.has_preprocessing,
    )
    session.add(clone)
    await session.flush()
    session.add(
        GlobalModelRound(
            model_id=clone.id,
            round=clone.round,
            weights=row[0],
            weights_format=model.weights_format,
            weights_size=model.weights_size,
        )
    )
    await session.flush()
    return clone


async def _current_weights(session: AsyncSession, model_id: uuid.UUID) -> bytes:
    data = (await session.execute(select(Model.weights).where(Model.id == model_id))).scalar_one_or_none()
    if data is None:
        raise NotFound(f"Model {model_id} has no stored weights.")
    return data


async def download(session: AsyncSession, model: Model, round_: int | None) -> bytes:
    """TorchScript bytes of the model; ``round_`` selects a global model's history entry."""
    if isinstance(model, GlobalModel):
        if round_ is None or round_ == model.round:
            return await _current_weights(session, model.id)
        row = (
            await session.execute(
                select(GlobalModelRound.weights)
                .where(GlobalModelRound.model_id == model.id, GlobalModelRound.round <= round_)
                .order_by(GlobalModelRound.round.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if row is None or round_ > model.round:
            raise NotFound(f"Model {model.id} has no weights for round {round_}.")
        return row
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


async def delete_model(requester: Requester, model: Model) -> None:
    """Owner, the organisation's admins or the training's actor (the policy's ``can_delete``)."""
    session = requester.session
    if not await can_delete(requester, model):
        raise Forbidden("You are neither the owner of the model nor the actor of the corresponding training.")
    training = await training_service.training_for_model(session, _global_id(model))
    if (
        training is not None
        and training.state in training_service.ACTIVE_STATES
        and isinstance(model, GlobalModel)
    ):
        raise Conflict("The model backs a running training; stop the training first.")
    await session.delete(model)
    await session.flush()


# --------------------------------------------------------------------------- updates


async def _participating_training(
    session: AsyncSession, user: User, model: Model
) -> tuple[Training, GlobalModel]:
    global_id = _global_id(model)
    training = await training_service.training_for_model(session, global_id, share=True)
    if training is None:
        raise NotFound(f"Model with ID {global_id} does not have a training process running.")
    if user.id not in training_service.participant_ids(training):
        raise Forbidden(f"You are not a participant of training {training.id}!")
    return training, await training_service.global_model(session, global_id)


async def add_update(
    session: AsyncSession,
    user: User,
    model: Model,
    *,
    data: bytes,
    round_: int,
    sample_size: int,
    metric_names: list[str],
    metric_values: list[str],
) -> LocalModel:
    """Store one client's update for the current round (a re-upload replaces the earlier one)."""
    training, glob = await _participating_training(session, user, model)
    if training.state != TrainingState.ONGOING or training.phase != training_service.PHASE_UPDATE:
        raise BadRequest(
            f"Training {training.id} is in state {training.state.value} ({training.phase} phase), "
            "not accepting updates.",
            code="wrong_state",
        )
    if round_ != glob.round:
        raise BadRequest(
            f"Training {training.id} is not currently in round {round_} (it is in round {glob.round}).",
            code="wrong_round",
        )
    if training.locked:
        raise Conflict(
            f"Round {glob.round} of training {training.id} is being aggregated.", code="round_locked"
        )
    metrics = _parse_metrics(metric_names, metric_values, required=False)
    spec = await aggregate.global_spec(session, glob.id, glob.round)

    def _validate(state: model_files.StateDict) -> bytes:
        model_files.validate_state_dict(state, spec)
        return model_files.encode_safetensors(state)

    try:
        state, _ = await model_files.decode_state_dict_async(data)
        encoded = await asyncio.to_thread(_validate, state)
    except ModelFileError as exc:
        raise file_error(exc) from None
    existing = (
        await session.execute(
            select(LocalModel).where(
                LocalModel.base_model_id == glob.id,
                LocalModel.round == glob.round,
                LocalModel.owner_id == user.id,
            )
        )
    ).scalar_one_or_none()
    if existing is not None:
        await session.execute(
            update(Model)
            .where(Model.id == existing.id)
            .values(
                weights=encoded, weights_size=len(encoded), weights_format="safetensors", updated_at=utcnow()
            )
        )
        existing.sample_size = sample_size
        await session.execute(Metric.__table__.delete().where(Metric.model_id == existing.id))
        local = existing
    else:
        local = LocalModel(
            owner_id=user.id,
            round=glob.round,
            base_model_id=glob.id,
            sample_size=sample_size,
            weights=encoded,
            weights_format="safetensors",
            weights_size=len(encoded),
        )
        session.add(local)
    await session.flush()
    _add_metrics(session, local.id, user.id, glob.round, metrics)
    await session.flush()
    return local


def _parse_metrics(
    names: list[str], values: list[str], *, required: bool
) -> list[tuple[str, float | None, bytes | None]]:
    if required and (not names or not values):
        raise BadRequest("Metric names or values are missing.", code="metrics_missing")
    if len(names) != len(values):
        raise BadRequest("Metric names and values must have the same length.", code="metrics_length")
    out = []
    for name, value in zip(names, values, strict=True):
        name = name.strip()
        if not name or len(name) > MAX_METRIC_KEY:
            raise BadRequest(f"Metric names must have 1 to {MAX_METRIC_KEY} characters.", code="metric_name")
        if "\x00" in name:  # PostgreSQL text cannot hold NUL
            raise BadRequest("Metric names must not contain NUL characters.", code="metric_name")
        try:
            out.append((name, float(value), None))
        except (TypeError, ValueError):
            out.append((name, None, str(value).encode()))
    return out


def _add_metrics(
    session: AsyncSession,
    model_id: uuid.UUID,
    reporter_id: uuid.UUID,
    step: int,
    metrics: list[tuple[str, float | None, bytes | None]],
) -> None:
    for key, value_float, value_binary in metrics:
        if value_float is not None and math.isnan(value_float):
            value_float = float("nan")
        session.add(
            Metric(
                model_id=model_id,
                key=key,
                value_float=value_float,
                value_binary=value_binary,
                step=step,
                reporter_id=reporter_id,
            )
        )


async def add_metrics(
    session: AsyncSession, user: User, model: Model, names: list[str], values: list[str]
) -> Training | None:
    """Metrics on a model at step = its round (the caller has been checked to read ``model``).
    On a training's model only its participants and actor report (the test round's results);
    returns the training to re-check."""
    metrics = _parse_metrics(names, values, required=True)
    training = await training_service.training_for_model(session, _global_id(model))
    if training is not None:
        if user.id not in training_service.participant_ids(training) and not training_service.is_actor(
            training, user
        ):
            raise Forbidden(f"You are not a participant of training {training.id}!")
    elif model.owner_id != user.id and not user.is_superuser:
        raise Forbidden("Only the model's owner may report metrics on it.")
    _add_metrics(session, model.id, user.id, model.round, metrics)
    await session.flush()
    if (
        training is not None
        and isinstance(model, GlobalModel)
        and training.phase == training_service.PHASE_TEST
    ):
        return training
    return None


async def list_metrics(requester: Requester, model: Model) -> list[MetricRead]:
    """The model's metrics, filtered by the metric policy's clause (one statement)."""
    rows = (
        await requester.session.execute(
            select(Metric)
            .options(undefer(Metric.value_binary))
            .where(Metric.model_id == model.id, readable(requester, Metric))
            .order_by(Metric.created_at)
        )
    ).scalars()
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
    ]


# --------------------------------------------------------------------------- preprocessing


async def get_preprocessing(session: AsyncSession, model: Model) -> bytes:
    global_id = _global_id(model)
    data = (
        await session.execute(select(GlobalModel.preprocessing).where(GlobalModel.id == global_id))
    ).scalar_one_or_none()
    if data is None:
        raise NotFound(f"Model '{model.id}' has no preprocessing model defined.")
    return data


async def set_preprocessing(requester: Requester, model: Model, data: bytes) -> None:
    session = requester.session
    if not isinstance(model, GlobalModel):
        raise BadRequest("Preprocessing modules belong to global models.")
    if not await can_update(requester, model):
        raise Forbidden(f"You are not the owner of model {model.id}!")
    try:
        await _check_preprocessing(data)
    except ModelFileError as exc:
        raise file_error(exc) from None
    await session.execute(
        update(GlobalModel)
        .where(GlobalModel.id == model.id)
        .values(preprocessing=data, has_preprocessing=True)
    )
    model.has_preprocessing = True


# --------------------------------------------------------------------------- SWAG


async def add_swag_statistics(
    session: AsyncSession,
    user: User,
    model: Model,
    *,
    round_: int,
    sample_size: int,
    first: bytes,
    second: bytes,
) -> Training:
    training, glob = await _participating_training(session, user, model)
    if training.state != TrainingState.SWAG_ROUND:
        raise BadRequest(
            f"Training {training.id} is in state {training.state.value}, not in a SWAG round (S).",
            code="wrong_state",
        )
    if round_ != glob.round:
        raise BadRequest(
            f"Training {training.id} is not currently in round {round_} (it is in round {glob.round}).",
            code="wrong_round",
        )
    if training.locked:
        raise Conflict(f"The SWAG round of training {training.id} is being aggregated.", code="round_locked")
    length = await aggregate.parameter_count(session, glob.id, glob.round)

    def _encode(fm: torch.Tensor, sm: torch.Tensor) -> tuple[bytes, bytes]:
        if bool((sm < 0).any()):
            raise ModelFileError("second_moment_file: a second moment (mean of squares) cannot be negative.")
        return model_files.encode_safetensors({"moment": fm}), model_files.encode_safetensors({"moment": sm})

    try:
        fm = await model_files.decode_flat_tensor_async(first, length=length, what="first_moment_file")
        sm = await model_files.decode_flat_tensor_async(second, length=length, what="second_moment_file")
        fm_bytes, sm_bytes = await asyncio.to_thread(_encode, fm, sm)
    except ModelFileError as exc:
        raise file_error(exc) from None
    existing = (
        await session.execute(
            select(SwagStatistic).where(
                SwagStatistic.training_id == training.id,
                SwagStatistic.round == glob.round,
                SwagStatistic.reporter_id == user.id,
            )
        )
    ).scalar_one_or_none()
    if existing is not None:
        await session.execute(
            update(SwagStatistic)
            .where(SwagStatistic.id == existing.id)
            .values(
                first_moment=fm_bytes, second_moment=sm_bytes, sample_size=sample_size, updated_at=utcnow()
            )
        )
    else:
        session.add(
            SwagStatistic(
                training_id=training.id,
                model_id=glob.id,
                round=glob.round,
                reporter_id=user.id,
                sample_size=sample_size,
                first_moment=fm_bytes,
                second_moment=sm_bytes,
                num_parameters=length,
            )
        )
    await session.flush()
    return training


async def swag_moments(session: AsyncSession, model: SWAGModel) -> tuple[bytes | None, bytes | None]:
    """The aggregated moments (safetensors, key ``moment``) — what inference samples from."""
    row = (
        await session.execute(
            select(SWAGModel.swag_first_moment, SWAGModel.swag_second_moment).where(SWAGModel.id == model.id)
        )
    ).one()
    return row[0], row[1]
