"""Training rounds billed through holds: reserved before a round starts (402 stops it), settled
after its aggregation at the prices fixed at reservation, released on error. Keys are
``training:{id}:round:{n}``; ``billing.hooks`` calls these from the training lifecycle."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.billing.holds import hold_by_key, release, reserve, settle
from flplatform.billing.ledger import payer_of
from flplatform.billing.operations import object_id
from flplatform.billing.prices import get_prices
from flplatform.orm.billing import Hold, Operation, OperationKind


def round_key(training_id: uuid.UUID, round_number: int) -> str:
    return f"training:{training_id}:round:{round_number}"


def _epochs(training: Any) -> int:
    value = (getattr(training, "options", None) or {}).get("epochs", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _samples_hint(training: Any, default: int) -> int:
    value = (getattr(training, "options", None) or {}).get("billing_samples_per_update", default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


async def reserve_round(
    session: AsyncSession, training: Any, round_number: int, participants: Sequence[Any]
) -> Hold | None:
    """Reserve the training actor's (or their organisation's) funds for one round: one update per participant at the
    price list's ``training_update`` + ``training_sample_epoch`` × samples × epochs, where samples
    is ``training_reserve_samples`` (or ``options["billing_samples_per_update"]``) and epochs
    ``options["epochs"]`` (default 1). Priced now; keyed ``training:{id}:round:{n}``. Returns
    None when free; raises 402 (nothing reserved) when the actor cannot afford it. Call it
    before the round starts."""
    prices = await get_prices(session)
    epochs, samples = _epochs(training), _samples_hint(training, prices.amount("training_reserve_samples"))
    per_update = prices.training_update_cost(samples, epochs)
    amount = per_update * len(participants)
    key = round_key(training.id, round_number)
    if amount == 0:
        return await hold_by_key(session, key)
    payer = await payer_of(session, training.actor_id)  # a member's organisation pays
    return await reserve(
        session,
        owner_id=training.actor_id,
        organization_id=payer.organization_id,
        amount=amount,
        key=key,
        training_id=training.id,
        round=round_number,
        currency=prices.currency("training_update"),
        details={
            "participants": [str(object_id(p)) for p in participants],
            "update": prices.amount("training_update"),
            "sample_epoch": prices.amount("training_sample_epoch"),
            "epochs": epochs,
            "samples_hint": samples,
        },
    )


async def settle_round(
    session: AsyncSession, training: Any, round_number: int, updates: Sequence[tuple[Any, int]]
) -> Operation | None:
    """Charge the round's received updates (``[(participant, sample_size)]``) at the prices
    fixed when it was reserved, at most the reserved amount, and release the rest. Idempotent;
    None when the round was free or already released. Call it after a successful aggregation."""
    hold = await hold_by_key(session, round_key(training.id, round_number))
    if hold is None:
        return None
    d = hold.details
    samples = sum(max(int(s), 0) for _, s in updates)
    cost = d["update"] * len(updates) + d["sample_epoch"] * samples * d["epochs"]
    return await settle(
        session,
        hold,
        cost,
        kind=OperationKind.TRAINING,
        model_id=getattr(training, "model_id", None),
        model_owner_id=training.actor_id,
        count_of_lines=samples,
        count_of_training_epoch=d["epochs"],
        description=f"training {training.id} round {round_number}: {len(updates)} updates",
    )


async def release_round(session: AsyncSession, training: Any, round_number: int, reason: str = "") -> bool:
    """Release a round's reservation (error, cancellation, timeout). Idempotent."""
    hold = await hold_by_key(session, round_key(training.id, round_number))
    return False if hold is None else await release(session, hold, reason=reason)
