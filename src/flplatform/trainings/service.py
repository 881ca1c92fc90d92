"""Trainings: creation, participants, and the round state machine.

States (``Training.state``) and phases (``Training.phase``)::

    I --start (>= 1 participant)--> O/update
    O/update --every current participant uploaded (or deadline + quorum)--> aggregation
        aggregation (claimed under a row lock, runs off the event loop) -->
            SWAG training:  S/swag  --all SWAG statistics (or deadline + quorum)--> O/…
            otherwise:      O/test (MODEL_TEST_ROUND) unless options.skip_model_tests
    O/test --every participant reported test metrics at step == round (or deadline)-->
        O/update (UPDATE_ROUND_START, next round)  or  C (TRAINING_FINISHED)
    any failure (aggregation error, quorum missed, client unreachable, no participants) --> E
    actor's stop --> E ("Stopped by the actor")

Requests never move the machine themselves: they store what arrived and schedule
:meth:`TrainingRuntime.advance`, which re-checks the conditions under the training's row lock
(``SELECT … FOR UPDATE`` on PostgreSQL; one in-process lock per training on SQLite, which has a
single writer). Aggregating a round is claimed with ``locked`` + a lease (``locked_until``), and in
the same transaction a ``training.aggregate`` job is put on the work queue (:mod:`flplatform.workqueue`,
de-duplicated per training, round, kind and claim). Any worker process on any host runs it; the
result is committed only while the claim still holds (``locked_until`` is the fencing token), so
a job that runs twice (its worker died after committing, or its lease expired while it stalled)
finishes the round exactly once. A dead worker's job is reclaimed after ``FLP_WORK_LEASE_SECONDS``;
a claim whose job never finishes at all is re-claimed by the periodic sweep after
``FLP_AGGREGATION_LEASE_SECONDS``.

Hook points for billing (called inside the transaction of the state change, may raise an
AppError such as PaymentRequired to refuse it): :data:`ROUND_STARTED_HOOKS` (each
``UPDATE_ROUND_START``) and :data:`ROUND_AGGREGATED_HOOKS` (each aggregation committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from flplatform import workqueue
from flplatform.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from flplatform.kit.tasks import spawn
from flplatform.orm import (
    GlobalModel,
    GlobalModelRound,
    Model,
    SWAGModel,
    Training,
    TrainingState,
    UncertaintyMethod,
    User,
)
from flplatform.orm.base import utcnow
from flplatform.orm.workqueue import WorkKind
from flplatform.settings import Settings
from flplatform.trainings import aggregate
from flplatform.trainings import notifications as notify
from flplatform.trainings.rounds import (  # noqa: F401 - re-exported: callers use training_service.X
    ACTIVE_STATES,
    PHASE_DONE,
    PHASE_SWAG,
    PHASE_TEST,
    PHASE_UPDATE,
    arrivals,
    participant_ids,
    phase_deadline,
    round_condition,
    swag_arrivals,
    test_reporters,
)
from flplatform.trainings.schemas import TrainingCreate

log = logging.getLogger(__name__)


# Billing (and anything else) hooks: async callables (session, training, round).
RoundHook = Callable[[AsyncSession, Training, int], Awaitable[None]]
ROUND_STARTED_HOOKS: list[RoundHook] = []
ROUND_AGGREGATED_HOOKS: list[RoundHook] = []


async def on_round_started(session: AsyncSession, training: Training, round_: int) -> None:
    for hook in ROUND_STARTED_HOOKS:
        await hook(session, training, round_)


async def on_round_aggregated(session: AsyncSession, training: Training, round_: int) -> None:
    for hook in ROUND_AGGREGATED_HOOKS:
        await hook(session, training, round_)


# --------------------------------------------------------------------------- queries


def _training_query(training_id: uuid.UUID) -> Any:
    return select(Training).options(selectinload(Training.participants)).where(Training.id == training_id)


async def get_training(
    session: AsyncSession, training_id: uuid.UUID, *, lock: bool = False, share: bool = False
) -> Training:
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


def is_actor(training: Training, user: User) -> bool:
    return training.actor_id == user.id or user.is_superuser


# --------------------------------------------------------------------------- CRUD


async def _users(session: AsyncSession, ids: Sequence[uuid.UUID]) -> list[User]:
    wanted = list(dict.fromkeys(ids))
    users = list((await session.execute(select(User).where(User.id.in_(wanted)))).scalars())
    missing = set(wanted) - {u.id for u in users}
    if missing:
        raise BadRequest(
            f"Not all provided users were found: {sorted(str(m) for m in missing)}", code="users_not_found"
        )
    return users


async def create_training(session: AsyncSession, actor: User, data: TrainingCreate) -> Training:
    from flplatform.models import service as model_service

    model = await model_service.get_model(session, data.model_id)
    if not isinstance(model, GlobalModel):
        raise BadRequest("A training needs a global model (not a local update).")
    if model.owner_id != actor.id and not actor.is_superuser:
        raise Forbidden("Only the model's owner may create a training with it.")
    if data.uncertainty_method == UncertaintyMethod.SWAG and not isinstance(model, SWAGModel):
        raise BadRequest(
            "uncertainty_method SWAG needs a model uploaded with type=SWAG.", code="swag_model_required"
        )
    if await training_for_model(session, model.id) is not None:
        model = await model_service.clone_global_model(session, model)
    clients = await _users(session, data.clients)
    options = data.options.model_dump(mode="json")
    try:
        aggregate.check_aggregator_options(options)
    except ValueError as exc:
        raise Unprocessable(f"options: {exc}", code="invalid_aggregator_options") from None
    training = Training(
        model_id=model.id,
        actor_id=actor.id,
        state=TrainingState.INITIAL,
        target_num_updates=data.target_num_updates,
        uncertainty_method=data.uncertainty_method,
        aggregation_method=data.aggregation_method,
        options=options,
        metric_names=list(data.metric_names),
        locked=False,
        phase=PHASE_UPDATE,
        start_round=model.round,
        participants=clients,
    )
    session.add(training)
    await session.flush()
    return training


async def add_participants(session: AsyncSession, training: Training, ids: Sequence[uuid.UUID]) -> list[User]:
    users = await _users(session, ids)
    present = participant_ids(training)
    new = [u for u in users if u.id not in present]
    if not new:
        return []
    training.participants.extend(new)
    training.last_update = utcnow()
    if training.state in ACTIVE_STATES:
        # Late joiners get the notification of the phase in progress so they can take part.
        model = await global_model(session, training.model_id)
        notify.enqueue(session, training.id, new, notify.TRAINING_START, _start_body(training, model))
        kind, body = _phase_notification(training, model)
        if kind is not None:
            notify.enqueue(session, training.id, new, kind, body)
    await session.flush()
    return new


async def remove_participants(
    session: AsyncSession, training: Training, ids: Sequence[uuid.UUID]
) -> list[User]:
    users = await _users(session, ids)
    present = participant_ids(training)
    gone = [u for u in users if u.id in present]
    if not gone:
        return []
    await _remove(session, training, gone, "Removed from the training by its actor or an administrator.")
    return gone


async def _remove(session: AsyncSession, training: Training, users: Sequence[User], reason: str) -> None:
    ids = [u.id for u in users]
    training.participants = [u for u in training.participants if u.id not in ids]
    for user_id in ids:
        await notify.drop_pending_for(session, training.id, user_id)
    if training.state in ACTIVE_STATES:
        model = await global_model(session, training.model_id)
        notify.enqueue(
            session,
            training.id,
            [u for u in users if u.notify_client_removed],
            notify.CLIENT_REMOVED,
            notify.client_removed_body(model.id, model.round, reason),
        )
    training.last_update = utcnow()
    await session.flush()


async def start_training(session: AsyncSession, training: Training) -> None:
    if training.state != TrainingState.INITIAL:
        raise BadRequest(f"Training {training.id} is not in state INITIAL!", code="wrong_state")
    if not training.participants:
        raise BadRequest("At least one participant must be registered!", code="no_participants")
    model = await global_model(session, training.model_id)
    training.state = TrainingState.ONGOING
    training.start_round = model.round
    notify.enqueue(
        session, training.id, training.participants, notify.TRAINING_START, _start_body(training, model)
    )
    await _begin_update_round(session, training, model, training.participants)
    await session.flush()


async def stop_training(session: AsyncSession, training: Training, reason: str) -> None:
    if training.state in (TrainingState.COMPLETED, TrainingState.ERROR):
        raise Conflict(f"Training {training.id} has already ended (state {training.state.value}).")
    was_active = training.state in ACTIVE_STATES
    await _fail(session, training, reason, notify_clients=was_active)


# --------------------------------------------------------------------------- transitions


def _mu(training: Training) -> float | None:
    return (training.options or {}).get("mu")


def _start_body(training: Training, model: GlobalModel) -> dict[str, Any]:
    return {
        "global_model_uuid": str(model.id),
        "round": model.round,
        "aggregation_method": training.aggregation_method.value,
        "uncertainty_method": training.uncertainty_method.value,
        "mu": _mu(training),
        "target_num_updates": training.target_num_updates,
    }


def _round_body(training: Training, model: GlobalModel, download: uuid.UUID | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"round": model.round, "global_model_uuid": str(download or model.id)}
    body["training_model_uuid"] = str(model.id)  # where updates go (differs from the download in FedDC)
    if _mu(training) is not None:
        body["mu"] = _mu(training)
    return body


def _phase_notification(training: Training, model: GlobalModel) -> tuple[str | None, dict[str, Any]]:
    if training.state == TrainingState.SWAG_ROUND:
        return notify.SWAG_ROUND_START, _round_body(training, model)
    if training.phase == PHASE_UPDATE:
        return notify.UPDATE_ROUND_START, _round_body(training, model)
    if training.phase == PHASE_TEST:
        return notify.MODEL_TEST_ROUND, _round_body(training, model)
    return None, {}


def _enter_phase(training: Training, phase: str) -> None:
    training.phase = phase
    training.phase_started_at = utcnow()
    training.last_update = utcnow()


async def _begin_update_round(
    session: AsyncSession,
    training: Training,
    model: GlobalModel,
    recipients: Sequence[User],
    downloads: dict[uuid.UUID, uuid.UUID] | None = None,
) -> None:
    _enter_phase(training, PHASE_UPDATE)
    await on_round_started(session, training, model.round)
    if downloads:
        notify.enqueue(
            session,
            training.id,
            recipients,
            notify.UPDATE_ROUND_START,
            lambda u: _round_body(training, model, downloads.get(u.id)),
        )
    else:
        notify.enqueue(
            session, training.id, recipients, notify.UPDATE_ROUND_START, _round_body(training, model)
        )


async def _after_aggregation(session: AsyncSession, training: Training, model: GlobalModel) -> None:
    if training.uncertainty_method == UncertaintyMethod.SWAG:
        training.state = TrainingState.SWAG_ROUND
        _enter_phase(training, PHASE_SWAG)
        notify.enqueue(
            session, training.id, training.participants, notify.SWAG_ROUND_START, _round_body(training, model)
        )
        return
    await _test_or_next(session, training, model)


async def _test_or_next(session: AsyncSession, training: Training, model: GlobalModel) -> None:
    training.state = TrainingState.ONGOING
    if (training.options or {}).get("skip_model_tests"):
        await _next_or_finish(session, training, model)
        return
    _enter_phase(training, PHASE_TEST)
    notify.enqueue(
        session, training.id, training.participants, notify.MODEL_TEST_ROUND, _round_body(training, model)
    )


async def _next_or_finish(session: AsyncSession, training: Training, model: GlobalModel) -> None:
    if model.round - training.start_round >= training.target_num_updates:
        training.state = TrainingState.COMPLETED
        _enter_phase(training, PHASE_DONE)
        actor = await session.get(User, training.actor_id)
        recipients = list(training.participants)
        if actor is not None and actor.id not in participant_ids(training):
            recipients.append(actor)
        notify.enqueue(
            session, training.id, recipients, notify.TRAINING_FINISHED, {"global_model_uuid": str(model.id)}
        )
        return
    await _begin_update_round(session, training, model, training.participants)


async def _fail(
    session: AsyncSession, training: Training, reason: str, *, notify_clients: bool = True
) -> None:
    log.warning("training %s -> Error: %s", training.id, reason)
    training.state = TrainingState.ERROR
    training.error_reason = reason[:2000]
    training.locked = False
    training.locked_until = None
    _enter_phase(training, PHASE_DONE)
    await notify.drop_pending_for(session, training.id)
    if notify_clients:
        notify.enqueue(
            session,
            training.id,
            training.participants,
            notify.TRAINING_FINISHED,
            {
                "global_model_uuid": str(training.model_id),
                "state": "E",
                "error_reason": training.error_reason,
            },
        )


# --------------------------------------------------------------------------- FedDC


def daisy_chain_period(training: Training) -> int:
    return int((training.options or {}).get("daisy_chain_period") or 0)


def aggregation_period(training: Training) -> int:
    d = daisy_chain_period(training)
    return int((training.options or {}).get("aggregation_period") or 2 * d)


def derangement(items: Sequence[uuid.UUID], rng: random.Random) -> list[uuid.UUID]:
    """A uniformly random permutation without fixed points (Sattolo's cycle is one)."""
    try:
        from flplatform.aggregation import derangement as _lib  # type: ignore[attr-defined]
    except ImportError:
        _lib = None
    if _lib is not None:
        return list(_lib(list(items), rng))  # pragma: no cover - depends on the aggregation package
    if len(items) < 2:
        return list(items)
    while True:
        perm = list(items)
        rng.shuffle(perm)
        if all(a != b for a, b in zip(perm, items, strict=True)):
            return perm


def participant_order(training: Training) -> Callable[[uuid.UUID], tuple[str, uuid.UUID]]:
    """Sort key of participant ids that is the same in every run (ids are random, names are chosen)."""
    names = {user.id: user.username for user in training.participants}
    return lambda owner: (names.get(owner, ""), owner)


async def _daisy_chain_step(
    session: AsyncSession,
    training: Training,
    model: GlobalModel,
    chosen: dict[uuid.UUID, tuple[uuid.UUID, int]],
) -> None:
    """FedDC round without aggregation: every d rounds the local models move to other clients
    (derangement), otherwise each client continues from its own local model."""
    done = model.round + 1 - training.start_round
    owners = sorted(chosen, key=participant_order(training))
    locals_ = [chosen[o][0] for o in owners]
    if done % daisy_chain_period(training) == 0 and len(owners) >= 2:
        seed = (training.options or {}).get("seed")
        rng = random.Random(f"{training.id if seed is None else seed}:{model.round}")
        assigned = derangement(locals_, rng)
    else:
        assigned = locals_
    downloads = dict(zip(owners, assigned, strict=True))
    model.round += 1
    await session.flush()
    await _begin_update_round(session, training, model, training.participants, downloads)


def _aggregates_now(training: Training, model: GlobalModel) -> bool:
    if daisy_chain_period(training) < 1:
        return True
    done = model.round + 1 - training.start_round
    return done % aggregation_period(training) == 0 or done >= training.target_num_updates


# --------------------------------------------------------------------------- the engine


AGGREGATE_JOB = "training.aggregate"  # work-queue kind of a round's aggregation


@dataclass
class _Job:
    """One claimed aggregation: what the work-queue payload carries."""

    kind: str  # "update" | "swag"
    model_id: uuid.UUID
    round: int
    items: list[tuple[uuid.UUID, int]]  # (row id, sample size)
    token: dt.datetime  # the claim's ``locked_until``: the result is committed only while it still holds

    def payload(self, training_id: uuid.UUID) -> dict[str, Any]:
        return {
            "training_id": str(training_id),
            "kind": self.kind,
            "model_id": str(self.model_id),
            "round": self.round,
            "items": [[str(row), size] for row, size in self.items],
            "token": self.token.isoformat(),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> tuple[uuid.UUID, _Job]:
        job = cls(
            kind=payload["kind"],
            model_id=uuid.UUID(payload["model_id"]),
            round=int(payload["round"]),
            items=[(uuid.UUID(row), int(size)) for row, size in payload["items"]],
            token=dt.datetime.fromisoformat(payload["token"]),
        )
        return uuid.UUID(payload["training_id"]), job

    def dedupe_key(self, training_id: uuid.UUID) -> str:
        # One job per claim: a round re-claimed after an expired lease gets a new token, so a new job.
        return f"training:{training_id}:round:{self.round}:{self.kind}:{self.token.isoformat()}"


@dataclass
class TrainingRuntime:
    """Per-process engine: advances trainings, runs aggregations, owns the notification dispatcher."""

    sessionmaker: async_sessionmaker[AsyncSession]
    settings: Settings
    dispatcher: notify.Dispatcher | None = None
    _locks: dict[uuid.UUID, asyncio.Lock] = field(default_factory=dict)

    def schedule(self, training_id: uuid.UUID) -> None:
        spawn(self.advance(training_id), name=f"advance-{training_id}")

    def kick(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.kick()

    async def advance(self, training_id: uuid.UUID) -> None:
        lock = self._locks.setdefault(training_id, asyncio.Lock())
        async with lock:
            try:
                for _ in range(100):
                    if not await self._step(training_id):
                        break
            except Exception as exc:  # a broken transition must not stall the training silently
                log.exception("training %s: advancing failed", training_id)
                await self._fail_after_exception(
                    training_id, f"Internal error while advancing the training: {exc}"
                )
            finally:
                self.kick()

    async def _fail_after_exception(self, training_id: uuid.UUID, reason: str) -> None:
        try:
            async with self.sessionmaker() as session:
                training = await get_training(session, training_id, lock=True)
                if training.state in ACTIVE_STATES:
                    await _fail(session, training, reason)
                    await session.commit()
        except Exception:
            log.exception("training %s: could not record the failure", training_id)

    async def _step(self, training_id: uuid.UUID) -> bool:
        job: _Job | None = None
        async with self.sessionmaker() as session:
            try:
                training = await get_training(session, training_id, lock=True)
            except NotFound:
                return False
            if training.state not in ACTIVE_STATES:
                return False
            now = utcnow()
            if training.locked:
                if training.locked_until is not None and training.locked_until > now:
                    return False
                log.warning("training %s: aggregation lease expired, claiming the round again", training.id)
                training.locked = False
                training.locked_until = None
            model = await global_model(session, training.model_id)
            condition = await round_condition(session, training, model, now)
            if not condition.met:
                await session.commit()  # keeps an expired lease released
                return False
            members, expired = condition.members, condition.expired
            if not members:
                await _fail(session, training, "No participants left in the training.")
                await session.commit()
                return False
            if condition.kind == "swag":
                chosen = await self._complete_or_deadline(
                    session, training, members, condition.arrived, expired, "SWAG statistics"
                )
                if chosen is None:
                    await session.commit()
                    return False
                job = self._claim(training, "swag", model, chosen, now)
            elif condition.kind == "update":
                chosen = await self._complete_or_deadline(
                    session, training, members, condition.arrived, expired, "updates"
                )
                if chosen is None:
                    await session.commit()
                    return False
                if not _aggregates_now(training, model):
                    await _daisy_chain_step(session, training, model, chosen)
                    await session.commit()
                    return True
                job = self._claim(training, "update", model, chosen, now)
            else:  # test round done (or its deadline passed, or tests are skipped)
                await _next_or_finish(session, training, model)
                await session.commit()
                return True
            # The job becomes visible with the claim (same transaction): there is never a claim
            # without its job, nor a job without its claim.
            await workqueue.enqueue(
                session,
                AGGREGATE_JOB,
                job.payload(training_id),
                dedupe_key=job.dedupe_key(training_id),
                model_id=job.model_id,
                max_attempts=self.settings.work_max_attempts,
            )
            await session.commit()
        return False  # the aggregation job advances the training further when it has finished

    async def aggregate(self, training_id: uuid.UUID, job: _Job) -> bool:
        """Run a claimed aggregation (the work-queue handler calls this) and, when it committed
        the round, advance the training further. False when the claim was no longer ours (the
        round was finished by an earlier run of the same job, re-claimed, or the training ended).
        An aggregation error ends the training in Error and is re-raised (the job records it)."""
        try:
            committed = await self._run(training_id, job)
        except NotFound:
            return False  # the training was deleted meanwhile
        except Exception as exc:  # aggregation failure: Error with the reason, never a silent stall
            log.exception("training %s: aggregation of round %s failed", training_id, job.round)
            await self._abort(training_id, job, f"Aggregation of round {job.round} failed: {exc}")
            self.kick()
            raise
        if committed:
            await self.advance(training_id)  # e.g. skip_model_tests: the next round starts now
        return committed

    async def _complete_or_deadline(
        self,
        session: AsyncSession,
        training: Training,
        members: set[uuid.UUID],
        arrived: dict[uuid.UUID, tuple[uuid.UUID, int]],
        expired: bool,
        what: str,
    ) -> dict[uuid.UUID, tuple[uuid.UUID, int]] | None:
        if members <= arrived.keys():
            return arrived
        if not expired:
            return None
        opts = training.options or {}
        quorum = opts.get("min_quorum") or len(members)
        if arrived and len(arrived) >= quorum:
            stragglers = members - arrived.keys()
            log.info(
                "training %s: deadline passed, aggregating %d of %d %s",
                training.id,
                len(arrived),
                len(members),
                what,
            )
            if opts.get("straggler_policy") == "remove" and stragglers:
                users = [u for u in training.participants if u.id in stragglers]
                await _remove(session, training, users, "Removed after missing the round deadline.")
            return arrived
        await _fail(
            session,
            training,
            f"Round deadline passed with {len(arrived)} of {len(members)} {what} (quorum {quorum}).",
        )
        return None

    def _claim(
        self,
        training: Training,
        kind: str,
        model: GlobalModel,
        chosen: dict[uuid.UUID, tuple[uuid.UUID, int]],
        now: dt.datetime,
    ) -> _Job:
        token = now + dt.timedelta(seconds=self.settings.aggregation_lease_seconds)
        training.locked = True
        training.locked_until = token
        # Folded in the order of the senders' usernames: float sums depend on the order, and this one
        # neither depends on arrival times nor on the (random) user ids, so the same updates give the
        # same global model bit for bit (a seeded `flplatform demo` is reproducible).
        items = [chosen[k] for k in sorted(chosen, key=participant_order(training))]
        return _Job(kind=kind, model_id=model.id, round=model.round, items=items, token=token)

    async def _still_claimed(self, training_id: uuid.UUID, job: _Job) -> bool:
        async with self.sessionmaker() as session:
            row = (
                await session.execute(
                    select(Training.locked, Training.locked_until, Training.state).where(
                        Training.id == training_id
                    )
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"Training {training_id} not found.")
        locked, locked_until, state = row
        return bool(locked) and locked_until == job.token and state in ACTIVE_STATES

    async def _run(self, training_id: uuid.UUID, job: _Job) -> bool:
        if not await self._still_claimed(training_id, job):
            # A re-run of a job whose round was already committed (its worker died before
            # recording the outcome), or a claim that was superseded: nothing to do.
            log.info(
                "training %s: aggregation claim of round %s no longer held; skipping", training_id, job.round
            )
            return False
        async with self.sessionmaker() as session:
            training = await get_training(session, training_id)
            options = dict(training.options or {})
            previous = (
                await session.execute(select(Training.aggregator_state).where(Training.id == training_id))
            ).scalar_one_or_none()
        if job.kind == "update":
            encoded, state = await aggregate.aggregate_updates(
                self.sessionmaker, job.model_id, job.items, options, previous
            )
            return await self._finish_update(training_id, job, encoded, state)
        first, second = await aggregate.aggregate_swag(self.sessionmaker, job.items)
        return await self._finish_swag(training_id, job, first, second)

    async def _owned(
        self, session: AsyncSession, training_id: uuid.UUID, job: _Job
    ) -> tuple[Training, GlobalModel] | None:
        training = await get_training(session, training_id, lock=True)
        model = await global_model(session, job.model_id)
        if not training.locked or training.locked_until != job.token or model.round != job.round:
            log.warning(
                "training %s: lost the aggregation claim of round %s; result discarded",
                training_id,
                job.round,
            )
            return None
        if training.state not in ACTIVE_STATES:
            return None
        return training, model

    async def _finish_update(self, training_id: uuid.UUID, job: _Job, encoded: bytes, state: bytes) -> bool:
        async with self.sessionmaker() as session:
            owned = await self._owned(session, training_id, job)
            if owned is None:
                return False
            training, model = owned
            new_round = job.round + 1
            await session.execute(
                update(Model)
                .where(Model.id == model.id)
                .values(
                    weights=encoded,
                    weights_size=len(encoded),
                    weights_format="torchscript",
                    round=new_round,
                    updated_at=utcnow(),
                )
            )
            model.round = new_round
            session.add(
                GlobalModelRound(
                    model_id=model.id,
                    round=new_round,
                    weights=encoded,
                    weights_format="torchscript",
                    weights_size=len(encoded),
                )
            )
            await session.execute(
                update(Training).where(Training.id == training.id).values(aggregator_state=state)
            )
            training.locked = False
            training.locked_until = None
            await on_round_aggregated(session, training, job.round)
            await _after_aggregation(session, training, model)
            await session.commit()
        aggregate.forget_cached(job.model_id)
        self.kick()
        return True

    async def _finish_swag(self, training_id: uuid.UUID, job: _Job, first: bytes, second: bytes) -> bool:
        async with self.sessionmaker() as session:
            owned = await self._owned(session, training_id, job)
            if owned is None:
                return False
            training, model = owned
            await session.execute(
                update(SWAGModel)
                .where(SWAGModel.id == model.id)
                .values(swag_first_moment=first, swag_second_moment=second)
            )
            training.locked = False
            training.locked_until = None
            await _test_or_next(session, training, model)
            await session.commit()
        self.kick()
        return True

    async def _abort(self, training_id: uuid.UUID, job: _Job, reason: str) -> None:
        async with self.sessionmaker() as session:
            try:
                training = await get_training(session, training_id, lock=True)
            except NotFound:  # deleted while aggregating
                return
            if training.locked_until == job.token and training.state in ACTIVE_STATES:
                await _fail(session, training, reason)
                await session.commit()

    # ------------------------------------------------------------------ dispatcher callbacks

    async def client_rejected(
        self, session: AsyncSession, training_id: uuid.UUID, user_id: uuid.UUID, reason: str
    ) -> None:
        try:
            training = await get_training(session, training_id, lock=True)
        except NotFound:
            return
        if training.state not in ACTIVE_STATES:
            return
        user = next((u for u in training.participants if u.id == user_id), None)
        if user is not None:
            log.warning("training %s: removing client %s (%s)", training_id, user_id, reason)
            await _remove(session, training, [user], "Removed after rejecting a round notification.")

    async def client_unreachable(self, session: AsyncSession, training_id: uuid.UUID, reason: str) -> None:
        try:
            training = await get_training(session, training_id, lock=True)
        except NotFound:
            return
        if training.state in ACTIVE_STATES:
            await _fail(session, training, reason)

    # ------------------------------------------------------------------ periodic sweep

    async def sweep(self) -> None:
        """Deadlines and expired aggregation leases: re-check the trainings that may move."""
        now = utcnow()
        async with self.sessionmaker() as session:
            rows = (
                await session.execute(
                    select(
                        Training.id,
                        Training.options,
                        Training.phase_started_at,
                        Training.locked,
                        Training.locked_until,
                    ).where(Training.state.in_(ACTIVE_STATES))
                )
            ).all()
        for training_id, options, started, locked, locked_until in rows:
            due = False
            if locked:
                due = locked_until is None or locked_until <= now
            else:
                seconds = (options or {}).get("round_deadline_seconds")
                due = (
                    bool(seconds)
                    and started is not None
                    and now >= started + dt.timedelta(seconds=float(seconds))
                )
            lock = self._locks.get(training_id)
            if due and not (lock and lock.locked()):
                self.schedule(training_id)

    async def recover(self) -> list[uuid.UUID]:
        """Crash recovery: schedule every active, unclaimed training whose round condition
        already holds (:func:`~flplatform.trainings.rounds.round_condition`, the rule the upload
        path uses). A process killed after acknowledging a round's last update, before
        claiming the round, leaves exactly this state behind; nothing else would look at it
        again. Claiming stays exactly-once across processes: ``advance`` re-checks under the
        training's row lock and claims with the ``training.aggregate`` job."""
        now = utcnow()
        due: list[uuid.UUID] = []
        async with self.sessionmaker() as session:
            ids = (
                (
                    await session.execute(
                        select(Training.id).where(
                            Training.state.in_(ACTIVE_STATES), Training.locked.is_(False)
                        )
                    )
                )
                .scalars()
                .all()
            )
            for training_id in ids:
                try:
                    training = await get_training(session, training_id)
                    model = await global_model(session, training.model_id)
                except NotFound:
                    continue
                if training.locked or training.state not in ACTIVE_STATES:
                    continue
                if (await round_condition(session, training, model, now)).met:
                    due.append(training_id)
        for training_id in due:
            lock = self._locks.get(training_id)
            if not (lock and lock.locked()):
                log.info("training %s: round condition met but not advanced; advancing now", training_id)
                self.schedule(training_id)
        return due

    async def run_sweeper(self) -> None:
        """Deadlines and leases every FLP_TRAINING_SWEEP_INTERVAL_SECONDS; crash recovery at
        start-up and every FLP_TRAINING_RECOVERY_INTERVAL_SECONDS."""
        loop = asyncio.get_running_loop()
        next_recovery = loop.time()  # at start-up
        while True:
            try:
                if loop.time() >= next_recovery:
                    next_recovery = loop.time() + self.settings.training_recovery_interval_seconds
                    await self.recover()
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("training sweep failed")
            await asyncio.sleep(self.settings.training_sweep_interval_seconds)


def runtime_of(app: FastAPI) -> TrainingRuntime:
    return app.state.training_runtime


@workqueue.handler(AGGREGATE_JOB, category=WorkKind.AGGREGATION)
async def run_aggregation_job(ctx: workqueue.JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Work-queue handler of ``training.aggregate``: in a server process it uses that process's
    runtime (its notification dispatcher is kicked at once); in ``flplatform worker`` a runtime of
    its own (the servers' dispatchers deliver the outbox on their next sweep)."""
    runtime = getattr(ctx.app.state, "training_runtime", None) if ctx.app is not None else None
    if runtime is None:
        runtime = ctx.shared.get("training_runtime")
        if runtime is None:
            runtime = ctx.shared["training_runtime"] = TrainingRuntime(
                sessionmaker=ctx.sessionmaker, settings=ctx.settings
            )
    training_id, job = _Job.from_payload(payload)
    committed = await runtime.aggregate(training_id, job)
    return {"training_id": str(training_id), "round": job.round, "kind": job.kind, "committed": committed}


@contextlib.asynccontextmanager
async def training_component(app: FastAPI) -> AsyncIterator[TrainingRuntime]:
    """Lifespan component: the engine, the notification dispatcher and the periodic sweep."""
    runtime = TrainingRuntime(sessionmaker=app.state.sessionmaker, settings=app.state.settings)
    runtime.dispatcher = notify.Dispatcher(
        app.state.sessionmaker,
        app.state.settings,
        on_rejected=runtime.client_rejected,
        on_failed=runtime.client_unreachable,
        after_change=runtime.schedule,
    )
    app.state.training_runtime = runtime
    loops = [
        asyncio.get_running_loop().create_task(runtime.dispatcher.run(), name="notification-dispatcher"),
        asyncio.get_running_loop().create_task(runtime.run_sweeper(), name="training-sweeper"),
    ]
    runtime.kick()
    try:
        yield runtime
    finally:
        # The dispatcher stops between database calls (a cancelled aiosqlite call can hang the
        # connection's close); it is cancelled only if that takes longer than a few seconds.
        runtime.dispatcher.stop()
        await asyncio.wait([loops[0]], timeout=5)
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


def count_distinct(column: Any) -> Any:
    return func.count(func.distinct(column))
