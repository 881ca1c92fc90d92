"""Aggregation from the blob store, folded while the round's updates still arrive.

**Folding on arrival.** For the methods whose result is a running weighted sum (FedAvg, FedProx and
the FedOpt family without DP: :attr:`Aggregator.streams`), the server process that accepts an update
keeps one :class:`RoundFolder` per open round: an aggregator begun for the round, into which every
committed update is folded at once (:func:`on_update`, called after the upload's commit), read as a
zero-copy view of the memory-mapped blob (:func:`flplatform.blobs.mapped.mapped`; from S3 a streamed
temporary file). Updates committed by other processes reach it through the training events bus (the
folder follows its training's wake-ups and re-reads the round's rows). When the round closes, the
aggregation job (:func:`flplatform.trainings.closing.aggregate_round`) takes the folder, folds only what is not folded yet, and
finishes: little is left to do after the last upload.

**Exactly once, and re-uploads.** The folder records which row it folded with which digest and
sample size. The close-time job reads the claimed items' digests; anything folded that is not among
them unchanged (a re-upload replaced the bytes or the sample size, or the participant was removed)
makes the folder start over and fold the current items from the store. Subtracting the old
contribution instead was rejected: floating-point sums are not invertible (``(a + b) − b ≠ a``), so
the result would depend on the upload history, and a seeded run would no longer be reproducible.
Replacements are rare; a refold costs one pass per update. Whatever the folder holds, the round
itself is closed exactly once by the claim of :mod:`flplatform.trainings.runtime`: the folder only
saves work, and a job that finds none (another process claimed the round, this one restarted, the
method keeps the close-time path) folds everything from the store: correct, just slower.

**One folder per round across processes.** On PostgreSQL a folder holds a session advisory lock on
(model, round) on a connection of its own; a process that cannot take it does not fold that round
(it only commits rows, whose events wake the folding process). A dead process's lock goes with its
connection. SQLite has one writing process.

**The folding process closes the round.** A round claimed by another process would be folded there
from the store, every update again (a model-sized pass per update, on the close's critical path).
So an upload whose round another process folds does not claim the round itself: the folding
process, woken by the upload's event, folds it and checks whether the round is complete
(:attr:`RoundFolder.advance`, side by side as for its own uploads), claims it and gets the job
first (``workqueue.enqueue(prefer_local=True)``). The uploading process re-checks the round after
:data:`CLAIM_BACKSTOP_SECONDS` in case the folding process could not (it died: its lock is gone,
and the round is claimed here and folded from the store, as before).

**Order independence.** A seeded run must give the same model bit for bit (issue 20), but arrival
order is not reproducible. Streamed methods therefore accumulate raw sample-size-weighted products
in float64 (unless the training set ``accumulate_dtype`` itself: then it folds only at close, in the
participants' fixed order) and the aggregator tracks the order (:attr:`Aggregator.track_order`):
at the close (:func:`finish`) it lists the few coordinates whose rounding to the model's dtype
another summation order could change (:mod:`flplatform.aggregation.ordering`: a per-block bound of
``Σ|n_i x_i|``, a monotonic-rounding test), and those alone are recomputed from the memory-mapped
updates in the participants' fixed order. The result is bitwise the fixed order's whatever the
arrival order, folded on arrival or at the close (``tests/aggregation/test_ordering.py``), so
folding on arrival is on by default (``FLP_FOLD_MAX_OPEN_ROUNDS``, 4 open rounds per process).
Updates under ``FLP_FOLD_ON_ARRIVAL_MIN_BYTES`` (4 MiB) open no folder: for them the fold's fixed
cost per update (sessions, reads, thread hand-offs: a few ms of server CPU) outweighs the
arithmetic, which the close does in a few ms for a whole round of them.
The accumulator is 2 models, plus one mapped update at a time (its pages dropped behind the fold:
a few MiB resident) and 1/64 of a float64 model of bound.

Methods that need every update at once (median, trimmed mean, (Multi-)Krum, DP, FedDC) keep the
close-time path, reading their updates from memory maps too.

The close itself (a folder taken over, or every update folded from the store) is
:mod:`flplatform.trainings.closing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from flplatform import aggregation
from flplatform.aggregation import Aggregator
from flplatform.blobs import BlobNotFound, BlobStore, store_for
from flplatform.kit import timeline
from flplatform.kit.tasks import spawn
from flplatform.models import files as model_files
from flplatform.orm import LocalModel, Model, Training, TrainingState
from flplatform.settings import Settings
from flplatform.trainings import archive_plans, buffer, events
from flplatform.trainings.aggregate import aggregator_options, global_weights, stored_bytes
from flplatform.trainings.fold_blobs import FOLD_PASS_UPDATES, fold_blobs
from flplatform.trainings.rounds import PHASE_UPDATE
from flplatform.trainings.settling import Rows, new_aggregator

log = logging.getLogger(__name__)

#: An upload whose round another process folds re-checks the round after this long, in case the
#: folding process did not claim it (see the module docstring).
CLAIM_BACKSTOP_SECONDS = 2.0

# Re-checks a training's round (the runtime's advance_if_due: training id, the upload's still_open)
Advance = Callable[[uuid.UUID, bool | None], Coroutine[Any, Any, None]]


def method_options(options: Mapping[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """The aggregator's name and options for a round, and whether it may fold on arrival.

    Streamed methods accumulate in float64 unless the training chose ``accumulate_dtype`` (see the
    module docstring: the result must not depend on the arrival order); FedDC rounds, which pass
    local models on, never fold on arrival."""
    name, kwargs = aggregator_options(dict(options))
    streams = aggregation.get(name, **kwargs).streams
    if streams:
        kwargs.setdefault("accumulate_dtype", "float64")
    foldable = (
        streams
        and kwargs["accumulate_dtype"] == "float64"
        and not int(options.get("daisy_chain_period") or 0)
        and not buffer.is_async(options)  # FedBuff folds its buffer against each update's base version
    )
    return name, kwargs, foldable


async def round_begin_args(
    sessionmaker: async_sessionmaker[AsyncSession],
    model_id: uuid.UUID,
    agg: Aggregator,
    previous_state: str | None,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """``begin``'s global model (only where the method needs it: decoding it holds a model) and the
    aggregator's state after the last round."""
    async with sessionmaker() as session:
        template = await global_weights(session, model_id) if agg.needs_global or agg.clip_norm else None
        state_bytes = (
            await stored_bytes(session, previous_state, "The aggregator state") if previous_state else None
        )
    global_state = (await model_files.decode_state_dict_async(template))[0] if template is not None else None
    del template
    prior = aggregation.decode_safetensors(state_bytes, copy=True) if state_bytes else None
    return global_state, prior


async def _rows(session: AsyncSession, model_id: uuid.UUID, round_: int) -> Rows:
    rows = await session.execute(
        select(LocalModel.id, LocalModel.weights_digest, LocalModel.sample_size)
        .where(LocalModel.base_model_id == model_id, LocalModel.round == round_)
        .order_by(LocalModel.created_at)
    )
    return {local: (digest, size) for local, digest, size in rows if digest is not None}


def lock_key(model_id: uuid.UUID, round_: int) -> int:
    """The advisory lock's 64-bit key of (model, round)."""
    raw = hashlib.sha256(f"flplatform.fold:{model_id}:{round_}".encode()).digest()
    return int.from_bytes(raw[:8], "big", signed=True)


@dataclass(eq=False)
class RoundFolder:
    """One open round's running aggregate in this process (see the module docstring)."""

    training_id: uuid.UUID
    model_id: uuid.UUID
    round: int
    sessionmaker: async_sessionmaker[AsyncSession]
    store: BlobStore
    name: str
    kwargs: dict[str, Any]
    begin_args: tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]
    guard: AsyncConnection | None = None  # holds the PostgreSQL advisory lock
    agg: Aggregator | None = None
    folded: Rows = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    refolds: int = 0
    on_arrival: int = 0  # updates folded before the round closed
    waiter: Any = None  # follow()'s subscription to the training's wake-ups
    # Re-checks the round when an update committed by another process is seen (that process leaves
    # the claim to this one: see the module docstring)
    advance: Advance | None = None

    def reset(self) -> Aggregator:
        agg = new_aggregator(self.name, self.kwargs)
        agg.begin(*self.begin_args)
        self.agg, self.folded = agg, {}
        return agg

    async def fold(self, rows: Rows, order: Sequence[uuid.UUID]) -> None:
        """Fold ``rows`` (in ``order``) so that the aggregate is exactly theirs: what is folded
        already and unchanged is kept; anything else folded (replaced, or not among them) makes
        it start over. Call under ``lock``."""
        agg = self.agg
        if agg is None or any(rows.get(local) != seen for local, seen in self.folded.items()):
            if self.folded:
                self.refolds += 1
                log.info(
                    "training %s round %s: a folded update was replaced; folding the round again",
                    self.training_id,
                    self.round,
                )
            agg = await asyncio.to_thread(self.reset)
        waiting = [local for local in order if local not in self.folded]
        for start in range(0, len(waiting), FOLD_PASS_UPDATES):
            batch = waiting[start : start + FOLD_PASS_UPDATES]
            items = [(rows[local][0], float(rows[local][1]), f"Local model {local}") for local in batch]
            await fold_blobs(agg, self.store, items)
            for local in batch:
                self.folded[local] = rows[local]

    async def sync(self, *, woken: bool = False) -> None:
        """Fold what was committed for the round since the last look (arrival path). ``woken``: by
        the training's events (maybe another process's upload): new rows also re-check the round."""
        async with self.lock:
            if self.closed:
                return
            async with self.sessionmaker() as session:
                row = (
                    await session.execute(
                        select(Model.round, Training.state)
                        .join(Training, Training.model_id == Model.id)
                        .where(Model.id == self.model_id)
                    )
                ).one_or_none()
                current = row is not None and row[0] == self.round and row[1] == TrainingState.ONGOING
                rows = await _rows(session, self.model_id, self.round) if current else {}
            if not current:  # the round was closed (maybe by another process), the training ended or is gone
                await _discard(self)
                return
            if woken and self.advance is not None and any(local not in self.folded for local in rows):
                # Claimed side by side with the fold, as an upload to this process is
                # (sweeper.advance_after_update); the job waits for the fold under the lock.
                spawn(self.advance(self.training_id, None), name=f"advance-{self.training_id}")
            before = len(self.folded)
            await self.fold(rows, list(rows))
            self.on_arrival += max(0, len(self.folded) - before)

    async def follow(self) -> None:
        """Re-read the round whenever its training records an event (here or, through the bus,
        in another process) until the folder is closed."""
        waiter = self.waiter = events.HUB.subscribe(self.training_id)
        try:
            while not self.closed:
                await waiter.event.wait()
                waiter.event.clear()
                try:
                    await self.sync(woken=True)
                except Exception:
                    log.exception(
                        "training %s: folding round %s on arrival failed", self.training_id, self.round
                    )
                    await _discard(self)
        finally:
            events.HUB.unsubscribe(self.training_id, waiter)

    async def close(self) -> None:
        self.closed = True
        self.agg = None
        if self.waiter is not None:
            self.waiter.event.set()  # ends follow()
        guard, self.guard = self.guard, None
        if guard is not None:
            with contextlib.suppress(Exception):
                await guard.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key(self.model_id, self.round)}
                )
            with contextlib.suppress(Exception):
                await guard.close()


# model id -> the open round's folder in this process
_FOLDERS: dict[uuid.UUID, RoundFolder] = {}
_OPENING: set[uuid.UUID] = set()


async def _discard(folder: RoundFolder) -> None:
    if _FOLDERS.get(folder.model_id) is folder:
        del _FOLDERS[folder.model_id]
    await folder.close()


async def close_all() -> None:
    """Close every folder of this process (at shutdown: their advisory locks are released)."""
    for folder in list(_FOLDERS.values()):
        await _discard(folder)


def open_folders() -> dict[uuid.UUID, RoundFolder]:
    """This process's folders by model id (for tests and the bench)."""
    return dict(_FOLDERS)


async def _guard(
    sessionmaker: async_sessionmaker[AsyncSession], key: int
) -> tuple[bool, AsyncConnection | None]:
    """On PostgreSQL: a connection holding the advisory lock ``key`` (False if another process
    holds it). SQLite: (True, None)."""
    engine = sessionmaker.kw["bind"]
    if engine.dialect.name != "postgresql":
        return True, None
    connection = await engine.connect()
    try:
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        got = (await connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})).scalar_one()
    except BaseException:
        await connection.close()
        raise
    if not got:
        await connection.close()
        return False, None
    return True, connection


async def _open(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    training_id: uuid.UUID,
    advance: Advance | None = None,
) -> tuple[RoundFolder | None, bool]:
    """The round's folder in this process (opened if this process may fold the round), and whether
    another process folds it (it holds the round's advisory lock)."""
    async with sessionmaker() as session:
        row = (
            await session.execute(
                select(
                    Training.state,
                    Training.phase,
                    Training.locked,
                    Training.options,
                    Training.model_id,
                    Training.aggregator_state_digest,
                    Model.round,
                    Model.weights_digest,
                )
                .join(Model, Model.id == Training.model_id)
                .where(Training.id == training_id)
            )
        ).one_or_none()
        store = store_for(session)
    if row is None:
        return None, False
    state, phase, locked, options, model_id, previous_state, round_, weights_digest = row
    existing = _FOLDERS.get(model_id)
    if existing is not None:
        if existing.round == round_ and not existing.closed:
            return existing, False
        if existing.round > round_:
            return None, False  # what we read is older than the folder: a later round is open already
        await _discard(existing)
    if state != TrainingState.ONGOING or phase != PHASE_UPDATE or locked:
        return None, False
    name, kwargs, foldable = method_options(options or {})
    while model_id in _OPENING:  # another upload of the round is opening it: fold into that one
        await asyncio.sleep(0.01)
    existing = _FOLDERS.get(model_id)
    if existing is not None and existing.round == round_ and not existing.closed:
        return existing, False
    if not foldable or len(_FOLDERS) >= settings.fold_max_open_rounds:
        return None, False
    _OPENING.add(model_id)
    try:
        got, guard = await _guard(sessionmaker, lock_key(model_id, round_))
        if not got:
            return None, True  # another process folds this round
        try:
            agg = new_aggregator(name, kwargs)
            begin_args = await round_begin_args(sessionmaker, model_id, agg, previous_state)
        except BaseException:
            if guard is not None:
                await guard.close()
            raise
        folder = RoundFolder(
            training_id, model_id, round_, sessionmaker, store, name, kwargs, begin_args, guard=guard
        )
        folder.advance = advance
        _FOLDERS[model_id] = folder
    finally:
        _OPENING.discard(model_id)
    spawn(folder.follow(), name=f"fold-{training_id}-{round_}")
    if weights_digest is not None:
        spawn(prepare_spare(store, weights_digest), name=f"spare-{training_id}-{round_}")
    if not archive_plans.known(model_id):
        spawn(archive_plans.learn(sessionmaker, model_id), name=f"storage-plan-{model_id}")
    return folder, False


async def prepare_spare(store: BlobStore, global_digest: str) -> None:
    """The round's new global is built in place at its close, about as large as the current one:
    a spare file for it (:meth:`BlobStore.prepare_spare`) also for a process's first close."""
    with contextlib.suppress(BlobNotFound):
        store.prepare_spare(await store.size(global_digest))


async def on_update(
    sessionmaker: async_sessionmaker[AsyncSession],
    settings: Settings,
    training_id: uuid.UUID,
    size: int | None = None,
    advance: Advance | None = None,
    still_open: bool | None = None,
) -> None:
    """After an update's commit: fold it (and whatever else arrived) into the round's folder,
    opening one if this process may fold the round, and side by side re-check the round with
    ``advance`` (the runtime's ``advance_if_due``, given ``still_open``: the upload's own read of
    whether the round still waits for others) — unless another process folds the round: that one
    claims it (module docstring), and ``advance`` runs here only after
    :data:`CLAIM_BACKSTOP_SECONDS`. An update of ``size`` bytes under
    ``FLP_FOLD_ON_ARRIVAL_MIN_BYTES`` opens nothing (its round's folder, if one is open already,
    still folds it when the commit's event wakes it: :meth:`RoundFolder.follow`); the close folds
    it. Folding never raises: the close-time path folds whatever this could not."""
    folder: RoundFolder | None = None
    elsewhere = False
    if settings.fold_max_open_rounds > 0 and (size is None or size >= settings.fold_on_arrival_min_bytes):
        try:
            folder, elsewhere = await _open(sessionmaker, settings, training_id, advance)
        except Exception:
            await _failed(training_id)
    if elsewhere:
        if advance is not None and still_open is not True:  # this upload may have completed the round
            await asyncio.sleep(CLAIM_BACKSTOP_SECONDS)
            await advance(training_id, None)
        return

    async def fold(folder: RoundFolder) -> None:
        try:
            await folder.sync()
        except Exception:
            await _failed(training_id)
        timeline.note(training_id, "arrival_fold_done")

    await asyncio.gather(
        *([fold(folder)] if folder is not None else []),
        *([advance(training_id, still_open)] if advance is not None else []),
    )


async def _failed(training_id: uuid.UUID) -> None:
    log.exception("training %s: folding an update on arrival failed", training_id)
    for folder in [f for f in _FOLDERS.values() if f.training_id == training_id]:
        await _discard(folder)


async def take(model_id: uuid.UUID, round_: int) -> RoundFolder | None:
    folder = _FOLDERS.pop(model_id, None)
    if folder is None:
        return None
    if folder.round != round_ or folder.closed:
        await folder.close()
        return None
    return folder
