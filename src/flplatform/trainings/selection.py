"""Client sampling per round (Flower's ``fraction_train``/``min_train_nodes``), recorded.

Every update round records which participants it asks (``training_round_selections``) and sets
``Training.selection_round``; the phase machine then waits for, notifies, aggregates and applies
its quorum and deadline to that set only (:func:`flplatform.trainings.rounds.member_ids`).

* Without ``options.clients_per_round`` every participant is selected (the behaviour of trainings
  before sampling), and participants added during a round join it.
* With it, ``clients_per_round`` participants are drawn (a count, or a fraction of the
  participants rounded up; at least ``min_clients_per_round``, at most all), by a seeded draw:
  ``random.Random(f"{seed}:clients:{round}")`` over the participants in username order, where
  ``seed`` is ``options.seed`` or the training id. The same training and round draw the same
  clients. With ``prefer_online_clients`` the draw takes online clients first, then those never
  heard from, then offline ones (:mod:`flplatform.trainings.liveness`).
* FedDC's daisy-chain rounds between two aggregations keep the selection of the round that
  started the chain, so the local models circulate among the same clients.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.kit.pagination import paginate
from flplatform.orm import LocalModel, RoundSelection, Training
from flplatform.orm.base import utcnow
from flplatform.trainings import liveness, participants
from flplatform.trainings.participants import Candidate
from flplatform.trainings.rounds import member_ids


def sampling(options: dict[str, Any] | None) -> bool:
    return (options or {}).get("clients_per_round") is not None


def sample_size(options: dict[str, Any] | None, available: int) -> int:
    """How many of ``available`` participants a round asks."""
    opts = options or {}
    value = opts.get("clients_per_round")
    if value is None:
        return available
    wanted = math.ceil(value * available) if isinstance(value, float) else int(value)
    wanted = max(wanted, int(opts.get("min_clients_per_round") or 1))
    return min(wanted, available)


def _order(users: Iterable[Candidate]) -> list[Candidate]:
    return sorted(users, key=lambda u: (u.username, u.id))


def _rng(training: Training, round_: int) -> random.Random:
    seed = (training.options or {}).get("seed")
    return random.Random(f"{training.id if seed is None else seed}:clients:{round_}")


async def draw(
    session: AsyncSession,
    training: Training,
    round_: int,
    candidates: Sequence[Candidate],
    wanted: int | None = None,
) -> list[Candidate]:
    """The participants ``round_`` asks (seeded; see the module's docstring); ``wanted``: how
    many (default: the sample size for the candidates). The candidates are users or the column
    tuples of :func:`flplatform.trainings.participants.candidates` (id and username are all the
    draw reads)."""
    opts = training.options or {}
    ordered = _order(candidates)
    wanted = sample_size(opts, len(ordered)) if wanted is None else min(wanted, len(ordered))
    if wanted >= len(ordered):
        return ordered
    rng = _rng(training, round_)
    if not opts.get("prefer_online_clients"):
        return _order(rng.sample(ordered, wanted))
    now, offline_after = utcnow(), liveness.settings_of(session).client_offline_after_seconds
    seen = await liveness.last_seen(session, [u.id for u in ordered])
    tiers: dict[str, list[Candidate]] = {liveness.ONLINE: [], liveness.UNKNOWN: [], liveness.OFFLINE: []}
    for user in ordered:
        tiers[liveness.status(seen.get(user.id), now, offline_after)].append(user)
    chosen: list[Candidate] = []
    for tier in (liveness.ONLINE, liveness.UNKNOWN, liveness.OFFLINE):
        need = wanted - len(chosen)
        group = tiers[tier]
        chosen += group if len(group) <= need else rng.sample(group, need)
    return _order(chosen)


async def record(session: AsyncSession, training: Training, round_: int, users: Sequence[Candidate]) -> None:
    """Record ``users`` as the selection of ``round_`` and make it the current one."""
    await session.execute(
        delete(RoundSelection).where(
            RoundSelection.training_id == training.id, RoundSelection.round == round_
        )
    )
    if users:
        now = utcnow()
        await session.execute(
            insert(RoundSelection),
            [
                {"training_id": training.id, "round": round_, "user_id": u.id, "selected_at": now}
                for u in users
            ],
        )
    training.selection_round = round_


async def select_round(
    session: AsyncSession,
    training: Training,
    round_: int,
    candidates: Sequence[Candidate] | None = None,
    *,
    registered: int | None = None,
) -> list[Candidate]:
    """Draw and record the selection of a new round among ``candidates`` (default: every
    participant, ``registered`` of them); returns the selected ones."""
    if candidates is None:
        chosen = await draw_participants(session, training, round_, registered)
    else:
        chosen = await draw(session, training, round_, candidates)
    await record(session, training, round_, chosen)
    return chosen


async def draw_participants(
    session: AsyncSession, training: Training, round_: int, registered: int | None = None
) -> list[Candidate]:
    """:func:`draw` among every participant, reading only the drawn ones when sampling: the
    seeded ``rng.sample`` over the ``registered`` positions of the (username, id) order picks the
    same positions as over the ordered participants themselves (it only draws indices), so the
    selection is the one :func:`draw` makes, for the cost of the sample, not of the fleet.
    Everyone selected, or ``prefer_online_clients`` (which reads every participant's liveness):
    :func:`draw` over all of them."""
    opts = training.options or {}
    n = await participants.count(session, training.id) if registered is None else registered
    wanted = sample_size(opts, n)
    if wanted >= n or opts.get("prefer_online_clients"):
        return await draw(session, training, round_, await participants.candidates(session, training.id))
    positions = _rng(training, round_).sample(range(n), wanted)
    return _order(await participants.at_positions(session, training.id, positions))


async def ask_more(session: AsyncSession, training: Training, round_: int) -> list[Candidate]:
    """With sampling, when every client a round asked was dropped: draw the round's sample size
    again among the participants it has not asked yet, add them to its selection and return
    them (the caller notifies them). Without sampling everyone was asked already: nothing."""
    if not sampling(training.options) or training.selection_round != round_:
        return []
    asked = set(
        (
            await session.execute(
                select(RoundSelection.user_id).where(
                    RoundSelection.training_id == training.id, RoundSelection.round == round_
                )
            )
        ).scalars()
    )
    everyone = await participants.candidates(session, training.id)
    fresh = [u for u in everyone if u.id not in asked]
    wanted = sample_size(training.options, len(everyone))
    chosen = await draw(session, training, round_, fresh, wanted) if fresh else []
    if chosen:
        await session.execute(
            insert(RoundSelection),
            [{"training_id": training.id, "round": round_, "user_id": u.id} for u in chosen],
        )
    return chosen


async def members(session: AsyncSession, training: Training) -> list[Candidate]:
    """The participants the current phase waits for (selected, not dropped), as column tuples in
    (username, id) order: the round's few, not the registered many."""
    return await participants.some(session, training.id, await member_ids(session, training))


async def join_current(session: AsyncSession, training: Training, users: Sequence[Candidate]) -> bool:
    """Participants added during a round: without sampling they join it (True), with sampling
    they wait for the next draw (False)."""
    if sampling(training.options):
        return False
    if training.selection_round is None or not users:
        return True
    existing = set(
        (
            await session.execute(
                select(RoundSelection.user_id).where(
                    RoundSelection.training_id == training.id,
                    RoundSelection.round == training.selection_round,
                )
            )
        ).scalars()
    )
    new = [u for u in users if u.id not in existing]
    if new:
        await session.execute(
            insert(RoundSelection),
            [{"training_id": training.id, "round": training.selection_round, "user_id": u.id} for u in new],
        )
    return True


async def drop(session: AsyncSession, training: Training, user_ids: Iterable[uuid.UUID], reason: str) -> None:
    """Take clients out of the current round (they stay participants)."""
    ids = list(user_ids)
    if training.selection_round is None or not ids:
        return
    await session.execute(
        update(RoundSelection)
        .where(
            RoundSelection.training_id == training.id,
            RoundSelection.round == training.selection_round,
            RoundSelection.user_id.in_(ids),
            RoundSelection.dropped_at.is_(None),
        )
        .values(dropped_at=utcnow(), drop_reason=reason[:200])
    )


async def history(
    session: AsyncSession, training: Training, rounds: Sequence[int]
) -> dict[int, dict[str, Any]]:
    """Per round of ``rounds``: who was selected, who answered (sent an update for that round of
    the training's global model) and who was dropped (with the reason)."""
    out: dict[int, dict[str, Any]] = {
        r: {"round": r, "selected": [], "answered": [], "dropped": []} for r in rounds
    }
    if not rounds:
        return out
    rows = await session.execute(
        select(
            RoundSelection.round,
            RoundSelection.user_id,
            RoundSelection.dropped_at,
            RoundSelection.drop_reason,
        )
        .where(RoundSelection.training_id == training.id, RoundSelection.round.in_(list(rounds)))
        .order_by(RoundSelection.round, RoundSelection.user_id)
    )
    for round_, user_id, dropped_at, reason in rows:
        entry = out[round_]
        entry["selected"].append(user_id)
        entry.setdefault("selected_at", None)
        if dropped_at is not None:
            entry["dropped"].append({"participant": user_id, "at": dropped_at, "reason": reason})
    answers = await session.execute(
        select(LocalModel.round, LocalModel.owner_id)
        .where(LocalModel.base_model_id == training.model_id, LocalModel.round.in_(list(rounds)))
        .distinct()
    )
    for round_, owner in answers:
        if owner in set(out[round_]["selected"]):
            out[round_]["answered"].append(owner)
    for entry in out.values():
        entry["answered"].sort(key=str)
        entry.pop("selected_at", None)
    return out


async def rounds_page(
    session: AsyncSession, training: Training, *, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """One page of the rounds with a recorded selection (newest first) and their total."""
    statement = select(RoundSelection.round).where(RoundSelection.training_id == training.id).distinct()
    rounds, total = await paginate(
        session, statement, order_by=[RoundSelection.round.desc()], limit=limit, offset=offset
    )
    found = await history(session, training, rounds)
    return [found[r] for r in rounds], total
