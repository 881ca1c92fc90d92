"""The per-process training engine: :class:`TrainingRuntime` advances trainings through the
round state machine (:mod:`flplatform.trainings.phases`), claims and finishes aggregations and
reacts to clients that reject or cannot receive notifications. The periodic sweep, crash
recovery and the lifespan component are in :mod:`flplatform.trainings.sweeper`.

Requests never move the machine themselves: they store what arrived and schedule
:meth:`TrainingRuntime.advance` (``sweeper.advance_after_commit``), which re-checks the conditions
under the training's row lock (``SELECT … FOR UPDATE`` on PostgreSQL; one in-process lock per
training on SQLite, which has a single writer). Aggregating a round is claimed with ``locked`` +
a lease (``locked_until``), and in the same transaction a ``training.aggregate`` job is put on the
work queue (:mod:`flplatform.workqueue`, de-duplicated per training, round, kind and claim; its
handler is :mod:`flplatform.trainings.jobs`). Any worker process on any host runs it; the result
is committed only while the claim still holds (``locked_until`` is the fencing token), so a job
that runs twice (its worker died after committing, or its lease expired while it stalled)
finishes the round exactly once. A dead worker's job is reclaimed after
``FLP_WORK_LEASE_SECONDS``; a claim whose job never finishes at all is re-claimed by the
periodic sweep after ``FLP_AGGREGATION_LEASE_SECONDS``.

The runtime is the one place in the domain that commits: each step is its own transaction.

Size: claiming, running and committing every kind of aggregation (synchronous rounds, SWAG, FedBuff
buffers) share the claim, lease and fencing token, and read best as one class.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform import workqueue
from flplatform.blobs import BlobInfo, store_for
from flplatform.errors import NotFound
from flplatform.kit import metrics, timeline
from flplatform.kit.tasks import spawn
from flplatform.models import layouts
from flplatform.orm import GlobalModel, GlobalModelRound, Model, SWAGModel, Training
from flplatform.orm.base import utcnow
from flplatform.settings import Settings
from flplatform.trainings import aggregate, asynchronous, closing, events, fold_ahead, hooks, participants
from flplatform.trainings import notifications as notify
from flplatform.trainings.phases import (
    after_aggregation,
    aggregates_now,
    daisy_chain_step,
    fail,
    next_or_finish,
    participant_order,
    remove_users,
    test_or_next,
)
from flplatform.trainings.repository import get_training, global_model
from flplatform.trainings.rounds import ACTIVE_STATES, round_condition, update_round_open

log = logging.getLogger(__name__)


AGGREGATE_JOB = "training.aggregate"  # work-queue kind of a round's aggregation


@dataclass
class AggregationJob:
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
    def from_payload(cls, payload: dict[str, Any]) -> tuple[uuid.UUID, AggregationJob]:
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


def _method(kind: str, options: dict[str, Any] | None) -> str:
    """The aggregation rule of a job, as the events name it."""
    if kind != "update":
        return asynchronous.METHOD if kind == asynchronous.KIND else "swag-mean"
    return aggregate.aggregator_options(dict(options or {}))[0]


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

    async def advance_if_due(self, training_id: uuid.UUID, still_open: bool | None = None) -> None:
        """:meth:`advance` after an update upload, skipped when one lock-free read shows the round
        still waits for other participants (:func:`~flplatform.trainings.rounds.update_round_open`):
        most uploads of a round then cost no row lock, no participant list and no dispatcher
        wake-up (such an upload writes no notification). ``still_open``: that read's answer where
        the upload made it in its own transaction (:func:`~flplatform.trainings.contributions.add_update`);
        None reads it now, after the commit."""
        if still_open is not None:
            if not still_open:
                await self.advance(training_id)
            return
        # One statement, read in autocommit: no ORM session, no BEGIN/ROLLBACK round trips.
        engine = self.sessionmaker.kw["bind"]
        async with engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            still_open = await update_round_open(connection, training_id, utcnow())
        if not still_open:
            await self.advance(training_id)

    async def _fail_after_exception(self, training_id: uuid.UUID, reason: str) -> None:
        try:
            async with self.sessionmaker() as session:
                training = await get_training(session, training_id, lock=True)
                if training.state in ACTIVE_STATES:
                    await fail(session, training, reason)
                    await session.commit()
        except Exception:
            log.exception("training %s: could not record the failure", training_id)

    async def _step(self, training_id: uuid.UUID) -> bool:
        job: AggregationJob | None = None
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
                await fail(session, training, "No participants left in the training.")
                await session.commit()
                return False
            if condition.kind == "swag":
                chosen = await self._complete_or_deadline(
                    session, training, members, condition.arrived, expired, "SWAG statistics"
                )
                if chosen is None:
                    await session.commit()
                    return False
                job = await self._claim(session, training, "swag", model, chosen, now)
            elif condition.kind == "buffer":  # asynchronous: the first K updates that arrived
                chosen = await asynchronous.take_buffer(session, training, condition)
                if chosen is None:
                    await session.commit()
                    return False
                job = await self._claim(session, training, asynchronous.KIND, model, chosen, now)
            elif condition.kind == "update":
                chosen = await self._complete_or_deadline(
                    session, training, members, condition.arrived, expired, "updates"
                )
                if chosen is None:
                    await session.commit()
                    return False
                if not aggregates_now(training, model):
                    await daisy_chain_step(session, training, model, chosen)
                    await session.commit()
                    return True
                job = await self._claim(session, training, "update", model, chosen, now)
            else:  # test round done (or its deadline passed, or tests are skipped)
                await next_or_finish(session, training, model)
                await session.commit()
                return True
            await events.record(
                session,
                training.id,
                events.AGGREGATION_STARTED,
                {
                    "round": job.round,
                    "kind": job.kind,
                    "updates": len(job.items),
                    "method": _method(job.kind, training.options),
                },
            )
            # The job becomes visible with the claim (same transaction): there is never a claim
            # without its job, nor a job without its claim. It is reserved for a moment for this
            # process's worker: the round's updates were folded here as they arrived (on PostgreSQL
            # with several processes the folding one claims the round: folding.on_update).
            await workqueue.enqueue(
                session,
                AGGREGATE_JOB,
                job.payload(training_id),
                dedupe_key=job.dedupe_key(training_id),
                model_id=job.model_id,
                max_attempts=self.settings.work_max_attempts,
                prefer_local=True,
            )
            await session.commit()
        timeline.note(training_id, "claim_committed")
        return False  # the aggregation job advances the training further when it has finished

    async def aggregate(
        self, training_id: uuid.UUID, job: AggregationJob, report: dict[str, Any] | None = None
    ) -> bool:
        """Run a claimed aggregation (the work-queue handler calls this) and, when it committed
        the round, advance the training further. False when the claim was no longer ours (the
        round was finished by an earlier run of the same job, re-claimed, or the training ended).
        An aggregation error ends the training in Error and is re-raised (the job records it).
        ``report``: facts about the run for the job's result (``closing.aggregate_round``)."""
        try:
            committed = await self._run(training_id, job, report)
        except NotFound:
            return False  # the training was deleted meanwhile
        except Exception as exc:  # aggregation failure: Error with the reason, never a silent stall
            log.exception("training %s: aggregation of round %s failed", training_id, job.round)
            await self._abort(training_id, job, f"Aggregation of round {job.round} failed: {exc}")
            self.kick()
            raise
        if committed:
            await self.advance(training_id)  # e.g. skip_model_tests: the next round starts now
            timeline.mark("advanced")
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
                users = await participants.some(session, training.id, stragglers)
                await remove_users(session, training, users, "Removed after missing the round deadline.")
            return arrived
        await fail(
            session,
            training,
            f"Round deadline passed with {len(arrived)} of {len(members)} {what} (quorum {quorum}).",
        )
        return None

    async def _claim(
        self,
        session: AsyncSession,
        training: Training,
        kind: str,
        model: GlobalModel,
        chosen: dict[uuid.UUID, tuple[uuid.UUID, int]],
        now: dt.datetime,
    ) -> AggregationJob:
        order = await participant_order(session, training, chosen)
        token = now + dt.timedelta(seconds=self.settings.aggregation_lease_seconds)
        training.locked = True
        training.locked_until = token
        # Folded in the order of the senders' usernames: float sums depend on the order, and this one
        # neither depends on arrival times nor on the (random) user ids, so the same updates give the
        # same global model bit for bit (a seeded `flplatform demo` is reproducible).
        items = [chosen[k] for k in sorted(chosen, key=order)]
        return AggregationJob(kind=kind, model_id=model.id, round=model.round, items=items, token=token)

    async def _still_claimed(
        self, training_id: uuid.UUID, job: AggregationJob
    ) -> tuple[dict[str, Any], str | None] | None:
        """The training's options and aggregator state digest while the claim is still ours, in
        one statement (the round's close waits for it), else None."""
        async with self.sessionmaker() as session:
            row = (
                await session.execute(
                    select(
                        Training.locked,
                        Training.locked_until,
                        Training.state,
                        Training.options,
                        Training.aggregator_state_digest,
                    ).where(Training.id == training_id)
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"Training {training_id} not found.")
        locked, locked_until, state, options, previous = row
        if not (bool(locked) and locked_until == job.token and state in ACTIVE_STATES):
            return None
        return dict(options or {}), previous

    async def _run(
        self, training_id: uuid.UUID, job: AggregationJob, report: dict[str, Any] | None = None
    ) -> bool:
        claimed = await self._still_claimed(training_id, job)
        if claimed is None:
            # A re-run of a job whose round was already committed (its worker died before
            # recording the outcome), or a claim that was superseded: nothing to do.
            log.info(
                "training %s: aggregation claim of round %s no longer held; skipping", training_id, job.round
            )
            return False
        timeline.mark("claim_checked")
        started = time.monotonic()
        options, previous = claimed
        if job.kind in ("update", asynchronous.KIND):
            method, elapsed = _method(job.kind, options), metrics.stopwatch()
            encoded: bytes | memoryview | BlobInfo
            if job.kind == asynchronous.KIND:
                encoded, state = await asynchronous.fold_buffer(
                    self.sessionmaker, job.model_id, job.items, options, previous
                )
            else:
                encoded, state = await closing.aggregate_round(
                    self.sessionmaker, job.model_id, job.round, job.items, options, previous, report
                )
            metrics.observe_aggregation(method, elapsed())
            committed = await self._finish_update(training_id, job, encoded, state, started)
            if committed:
                metrics.round_completed(method)
            return committed
        first, second = await aggregate.aggregate_swag(self.sessionmaker, job.items)
        return await self._finish_swag(training_id, job, first, second, started)

    async def _owned(
        self, session: AsyncSession, training_id: uuid.UUID, job: AggregationJob
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

    async def _finished(
        self, session: AsyncSession, training: Training, job: AggregationJob, started: float, new_round: int
    ) -> None:
        await events.record(
            session,
            training.id,
            events.AGGREGATION_FINISHED,
            {
                "round": job.round,
                "kind": job.kind,
                "new_round": new_round,
                "updates": len(job.items),
                "method": _method(job.kind, training.options),
                "duration_seconds": round(time.monotonic() - started, 6),
            },
        )

    async def _finish_update(
        self,
        training_id: uuid.UUID,
        job: AggregationJob,
        encoded: bytes | memoryview | BlobInfo,
        state: bytes,
        started: float,
    ) -> bool:
        async with self.sessionmaker() as session:
            # Blobs first, rows after: a crash in between leaves only unreferenced blobs (swept).
            store = store_for(session)
            stored = encoded if isinstance(encoded, BlobInfo) else await store.put(encoded)
            stored_state = await store.put(state)
            del encoded, state
            timeline.mark("state_stored")
            owned = await self._owned(session, training_id, job)
            if owned is None:
                return False
            timeline.mark("claim_locked")
            training, model = owned
            new_round = job.round + 1
            # Aggregation keeps names, dtypes and shapes: the new blob has the old one's layout.
            await layouts.carry(session, model.weights_digest, stored.digest)
            await session.execute(
                update(Model)
                .where(Model.id == model.id)
                .values(
                    weights_digest=stored.digest,
                    weights_size=stored.size,
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
                    weights_digest=stored.digest,
                    weights_format="torchscript",
                    weights_size=stored.size,
                )
            )
            keep = self.settings.global_history_keep_rounds
            if keep > 0:  # the history's retention: the last `keep` rounds (the sweep frees their blobs)
                await session.execute(
                    delete(GlobalModelRound).where(
                        GlobalModelRound.model_id == model.id, GlobalModelRound.round <= new_round - keep
                    )
                )
            await session.execute(
                update(Training)
                .where(Training.id == training.id)
                .values(aggregator_state_digest=stored_state.digest)
            )
            training.locked = False
            training.locked_until = None
            await hooks.ROUND_AGGREGATED(session, training, job.round)
            await self._finished(session, training, job, started, new_round)
            if job.kind == asynchronous.KIND:
                await asynchronous.after_fold(session, training, model, [row for row, _ in job.items])
            else:
                await after_aggregation(session, training, model)
            timeline.mark("next_round_prepared")
            await session.commit()
            timeline.mark("committed")
        aggregate.forget_cached(job.model_id)
        self.kick()
        spawn(
            fold_ahead.prepare_round(self.sessionmaker, self.settings, training_id),
            name=f"ahead-{training_id}",
        )
        return True

    async def _finish_swag(
        self, training_id: uuid.UUID, job: AggregationJob, first: bytes, second: bytes, started: float
    ) -> bool:
        async with self.sessionmaker() as session:
            store = store_for(session)
            first_digest, second_digest = (await store.put(first)).digest, (await store.put(second)).digest
            owned = await self._owned(session, training_id, job)
            if owned is None:
                return False
            training, model = owned
            await session.execute(
                update(SWAGModel)
                .where(SWAGModel.id == model.id)
                .values(swag_first_digest=first_digest, swag_second_digest=second_digest)
            )
            training.locked = False
            training.locked_until = None
            await self._finished(session, training, job, started, model.round)
            await test_or_next(session, training, model)
            await session.commit()
        self.kick()
        return True

    async def _abort(self, training_id: uuid.UUID, job: AggregationJob, reason: str) -> None:
        async with self.sessionmaker() as session:
            try:
                training = await get_training(session, training_id, lock=True)
            except NotFound:  # deleted while aggregating
                return
            if training.locked_until == job.token and training.state in ACTIVE_STATES:
                await fail(session, training, reason)
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
        user = next(iter(await participants.users(session, training_id, [user_id])), None)
        if user is not None:
            log.warning("training %s: removing client %s (%s)", training_id, user_id, reason)
            await remove_users(session, training, [user], "Removed after rejecting a round notification.")

    async def client_unreachable(self, session: AsyncSession, training_id: uuid.UUID, reason: str) -> None:
        try:
            training = await get_training(session, training_id, lock=True)
        except NotFound:
            return
        if training.state in ACTIVE_STATES:
            await fail(session, training, reason)

    def busy(self, training_id: uuid.UUID) -> bool:
        """Whether this process is advancing the training right now."""
        lock = self._locks.get(training_id)
        return bool(lock and lock.locked())
