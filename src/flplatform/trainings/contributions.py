"""The round rules for what participants send: a client's update for the current round, test
metrics (which end a test round), SWAG statistics. Each checks that the caller takes part in
the model's training and that the training is in the phase and round the upload is for, then
stores it; the engine (:mod:`flplatform.trainings.runtime`) decides, after the commit, whether
the round is complete. Metrics on a model that backs no training are its owner's to report.
"""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from dataclasses import dataclass
from typing import Any, cast

import torch
from sqlalchemy import Table, and_, bindparam, delete, exists, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.blobs import store_for
from flplatform.blobs.multipart import FilePart
from flplatform.errors import BadRequest, Conflict, Forbidden, NotFound
from flplatform.kit.metrics import observe_upload, stopwatch
from flplatform.models import files as model_files
from flplatform.models import uploads
from flplatform.models.files import ModelFileError
from flplatform.models.service import file_error, global_id_of
from flplatform.models.update_header import UpdateInspector
from flplatform.orm import (
    GlobalModel,
    LocalModel,
    Metric,
    Model,
    ModelKind,
    SwagStatistic,
    Training,
    TrainingState,
    User,
)
from flplatform.orm.base import utcnow
from flplatform.orm.training import training_participants
from flplatform.trainings import aggregate, buffer, events, participants
from flplatform.trainings.repository import training_for_model
from flplatform.trainings.rounds import PHASE_TEST, PHASE_UPDATE, update_round_open
from flplatform.trainings.service import is_actor

MAX_METRIC_KEY = 128


def _participation_reads() -> tuple[Any, Any, Any]:
    """The statements of :func:`_participating_training`, built once (every client update runs
    them). SQLite: the training under FOR SHARE, whether the caller takes part, the global model
    and the caller's update of the round, if any, in one statement. PostgreSQL: the training and
    whether the caller takes part; then, after the lock, the global model with that update."""
    takes_part = (
        exists()
        .where(
            training_participants.c.training_id == Training.id,
            training_participants.c.user_id == bindparam("user_id"),
        )
        .correlate(Training)
    )
    models, locals_ = cast(Table, Model.__table__), cast(Table, LocalModel.__table__)
    mine_models, mine = models.alias("mine_models"), locals_.alias("mine")
    existing = mine.join(mine_models, mine_models.c.id == mine.c.id)
    existing_on = and_(
        mine.c.base_model_id == GlobalModel.id,
        mine_models.c.round == bindparam("round", type_=mine_models.c.round.type),
        mine_models.c.owner_id == bindparam("user_id"),
    )
    training_of = Training.model_id == bindparam("model_id")
    together = (
        select(Training, takes_part, GlobalModel, mine.c.id, mine.c.folded_into)
        .join(GlobalModel, GlobalModel.id == Training.model_id)
        .outerjoin(existing, existing_on)
        .where(training_of)
    )
    alone = select(Training, takes_part).where(training_of)
    global_with_mine = (
        select(GlobalModel, mine.c.id, mine.c.folded_into)
        .outerjoin(existing, existing_on)
        .where(GlobalModel.id == bindparam("model_id"))
        .execution_options(populate_existing=True)
    )
    together, alone = (
        stmt.with_for_update(read=True, of=Training).execution_options(populate_existing=True)
        for stmt in (together, alone)
    )
    return together, alone, global_with_mine


_TRAINING_WITH_GLOBAL, _TRAINING_ALONE, _GLOBAL_WITH_MINE = _participation_reads()


@dataclass(frozen=True)
class _Existing:
    """The caller's update of the round already stored (a re-upload replaces it)."""

    id: uuid.UUID
    folded_into: int | None


async def _participating_training(
    session: AsyncSession, user: User, model: Model, round_: int | None = None
) -> tuple[Training, GlobalModel, _Existing | None]:
    """The training the model's global model backs, under ``FOR SHARE`` (as before an upload), if
    ``user`` takes part in it, with the global model and the caller's update of ``round_`` (None
    without one). The participant list itself is not loaded: an upload needs only its own row.

    On SQLite it is one statement: a statement reads one consistent snapshot, and there is no row
    lock to wait for. On PostgreSQL two: after waiting for the training's lock, read committed
    re-checks only the locked row, so a model row read in the same statement could be the one from
    before a round advance; the global model (and the caller's update) is read by the next
    statement, after the lock."""
    global_id = global_id_of(model)
    together = session.get_bind().dialect.name == "sqlite"
    params = {"model_id": global_id, "user_id": user.id, "round": round_}
    row = (
        await session.execute(_TRAINING_WITH_GLOBAL if together else _TRAINING_ALONE, params)
    ).one_or_none()
    if row is None:
        raise NotFound(f"Model with ID {global_id} does not have a training process running.")
    training, participant = row[0], row[1]
    if not participant:
        raise Forbidden(f"You are not a participant of training {training.id}!")
    rest: Any = row[2:]  # (global model, the caller's update's id and folded_into)
    if not together:
        rest = (await session.execute(_GLOBAL_WITH_MINE, params)).one_or_none()
        if rest is None:
            raise NotFound(f"Global model {global_id} not found.")
    glob, mine_id, mine_folded = rest
    return training, glob, _Existing(mine_id, mine_folded) if mine_id is not None else None


def _check_accepting_updates(training: Training) -> None:
    if training.state != TrainingState.ONGOING or training.phase != PHASE_UPDATE:
        raise BadRequest(
            f"Training {training.id} is in state {training.state.value} ({training.phase} phase), "
            "not accepting updates.",
            code="wrong_state",
        )


async def update_layout(session: AsyncSession, user: User, model: Model) -> dict[str, model_files.TensorSpec]:
    """Before an update's body is read: the caller takes part in the model's training, which
    accepts updates now; returns the layout the update must have (what the streamed body is
    checked against from its first bytes). :func:`add_update` checks everything again under the
    training's row lock once the body has arrived."""
    training, glob, _ = await _participating_training(session, user, model)
    _check_accepting_updates(training)
    if training.locked and not buffer.is_async(training.options):
        raise Conflict(
            f"Round {glob.round} of training {training.id} is being aggregated.", code="round_locked"
        )
    # Not persisted here: on SQLite a row written now would hold the write lock for the whole body.
    # glob was read after the training's FOR SHARE: its digest is the current one.
    return await aggregate.global_spec(
        session, glob.id, glob.round, persist=False, digest=glob.weights_digest
    )


async def add_update(
    session: AsyncSession,
    user: User,
    model: Model,
    *,
    upload: FilePart,
    inspector: UpdateInspector,
    round_: int,
    sample_size: int,
    metric_names: list[str],
    metric_values: list[str],
) -> tuple[uuid.UUID, Training, bool]:
    """Store one client's update for the current round (a re-upload replaces the earlier one);
    returns its local model's id with the training to re-check and whether the round certainly still waits for
    other updates once this transaction commits (then the upload need not re-check it under the
    row lock). ``upload`` is the streamed body's file part, whose first bytes ``inspector`` has
    seen (:mod:`flplatform.models.update_header`); it is published as a blob only once every
    check passed.

    The "still waiting?" read (:func:`~flplatform.trainings.rounds.update_round_open`) is made in
    this transaction after the update's event was recorded: recording it bumps the training's
    event counter row, which stays locked until the commit, so of two uploads of a training the
    second reads only after the first committed (PostgreSQL's read committed takes a new
    snapshot per statement; SQLite has one writer, and this transaction writes already). The
    upload that commits last therefore sees every other one: the round's last update is never
    missed. (It was read after the commit, on a connection of its own: a checkout, and on
    SQLite the autocommit switch and reset, per upload.)"""
    elapsed = stopwatch()
    training, glob, existing = await _participating_training(session, user, model, round_)
    _check_accepting_updates(training)
    asynchronous = buffer.is_async(training.options)
    if asynchronous:  # `round` names the version it was trained from; the buffer takes uploads while folding
        await buffer.check_base(session, training, glob, round_)
    elif round_ != glob.round:
        raise BadRequest(
            f"Training {training.id} is not currently in round {round_} (it is in round {glob.round}).",
            code="wrong_round",
        )
    elif training.locked:
        raise Conflict(
            f"Round {glob.round} of training {training.id} is being aggregated.", code="round_locked"
        )
    metrics = _parse_metrics(metric_names, metric_values, required=False)
    spec = await aggregate.global_spec(session, glob.id, glob.round, digest=glob.weights_digest)
    if inspector.spec is not None and spec != inspector.spec:
        raise Conflict(
            f"The global model of training {training.id} changed while the update was uploaded.",
            code="model_changed",
        )
    try:
        stored = await uploads.store_update(store_for(session), upload, inspector, spec)
    except ModelFileError as exc:
        raise file_error(exc) from None
    # Core statements, no ORM objects: the upload needs the row's id, not the row.
    statements = _row_statements(session.get_bind().dialect.name)
    now = utcnow()
    if existing is not None:
        local_id = existing.id
        if asynchronous:
            buffer.check_replace(existing.folded_into, round_, training)
        models, locals_, metrics_table = _tables()
        await session.execute(
            update(models)
            .where(models.c.id == local_id)
            .values(
                weights_digest=stored.digest,
                weights_size=stored.size,
                weights_format="safetensors",
                updated_at=now,
            )
        )
        await session.execute(update(locals_).where(locals_.c.id == local_id).values(sample_size=sample_size))
        await session.execute(delete(metrics_table).where(metrics_table.c.model_id == local_id))
    else:
        local_id = uuid.uuid4()
        row = {
            "id": local_id,
            "owner_id": user.id,
            "organization_id": glob.organization_id,  # the tenant rule's answer, without its look-up
            "round": round_,
            "weights_digest": stored.digest,
            "weights_size": stored.size,
            "now": now,
            "base_model_id": glob.id,
            "sample_size": sample_size,
        }
        for statement in statements.insert:
            await session.execute(statement, row)
    if metrics:
        _add_metrics(session, local_id, user.id, round_, metrics)
        await session.flush()
    await events.record(
        session,
        training.id,
        events.UPDATE_RECEIVED,
        {
            "round": round_,
            "participant_id": user.id,
            "participant": user.username,
            "sample_size": sample_size,
            "replaced": existing is not None,
            **({"version": glob.round, "staleness": glob.round - round_} if asynchronous else {}),
            **(events.metrics_payload(metrics) if metrics else {}),
        },
    )
    still_open = not asynchronous and await update_round_open(session, training.id, utcnow())
    observe_upload("update", upload.size, elapsed())
    return local_id, training, still_open


def _tables() -> tuple[Table, Table, Table]:
    return cast(Table, Model.__table__), cast(Table, LocalModel.__table__), cast(Table, Metric.__table__)


@dataclass(frozen=True)
class _RowStatements:
    insert: tuple[Any, ...]  # a new update's rows


@functools.cache
def _row_statements(dialect: str) -> _RowStatements:
    """The upload's row statements for ``dialect``, built once per process (building them cost more
    CPU than running them), their values bound parameters. On PostgreSQL a new update's two rows
    are one statement (the parent row's insert a data-modifying CTE)."""
    models, locals_, _ = _tables()
    now = bindparam("now", type_=models.c.created_at.type)
    local_id = bindparam("id", type_=models.c.id.type)
    parent = insert(models).values(
        id=local_id,
        kind=ModelKind.LOCAL.value,
        owner_id=bindparam("owner_id", type_=models.c.owner_id.type),
        organization_id=bindparam("organization_id", type_=models.c.organization_id.type),
        round=bindparam("round", type_=models.c.round.type),
        weights_digest=bindparam("weights_digest", type_=models.c.weights_digest.type),
        weights_format="safetensors",
        weights_size=bindparam("weights_size", type_=models.c.weights_size.type),
        created_at=now,
        updated_at=now,
    )
    base_model_id = bindparam("base_model_id", type_=locals_.c.base_model_id.type)
    sample_size = bindparam("sample_size", type_=locals_.c.sample_size.type)
    if dialect != "postgresql":
        child = insert(locals_).values(id=local_id, base_model_id=base_model_id, sample_size=sample_size)
        return _RowStatements((parent, child))
    inserted = parent.returning(models.c.id).cte("parent")
    both = insert(locals_).from_select(
        ["id", "base_model_id", "sample_size"], select(inserted.c.id, base_model_id, sample_size)
    )
    return _RowStatements((both,))


def _parse_metrics(
    names: list[str], values: list[str], *, required: bool
) -> list[tuple[str, float | None, bytes | None]]:
    if required and (not names or not values):
        raise BadRequest("Metric names or values are missing.", code="metrics_missing")
    if len(names) != len(values):
        raise BadRequest("Metric names and values must have the same length.", code="metrics_length")
    out: list[tuple[str, float | None, bytes | None]] = []
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
    training = await training_for_model(session, global_id_of(model))
    if training is not None:
        if not is_actor(training, user) and not await participants.is_participant(
            session, training.id, user.id
        ):
            raise Forbidden(f"You are not a participant of training {training.id}!")
    elif model.owner_id != user.id and not user.is_superuser:
        raise Forbidden("Only the model's owner may report metrics on it.")
    _add_metrics(session, model.id, user.id, model.round, metrics)
    await session.flush()
    if training is not None:
        await events.record(
            session,
            training.id,
            events.TEST_METRICS_RECEIVED,
            {
                "round": model.round,
                "model_id": model.id,
                "participant_id": user.id,
                "participant": user.username,
                "phase": training.phase,
                **events.metrics_payload(metrics),
            },
        )
    if training is not None and isinstance(model, GlobalModel) and training.phase == PHASE_TEST:
        return training
    return None


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
    training, glob, _ = await _participating_training(session, user, model)
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
    store = store_for(session)
    fm_digest, sm_digest = (await store.put(fm_bytes)).digest, (await store.put(sm_bytes)).digest
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
                first_moment_digest=fm_digest,
                second_moment_digest=sm_digest,
                sample_size=sample_size,
                updated_at=utcnow(),
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
                first_moment_digest=fm_digest,
                second_moment_digest=sm_digest,
                num_parameters=length,
            )
        )
    await session.flush()
    await events.record(
        session,
        training.id,
        events.SWAG_STATISTICS_RECEIVED,
        {
            "round": glob.round,
            "participant_id": user.id,
            "participant": user.username,
            "sample_size": sample_size,
        },
    )
    return training
