"""Participants by collection: a training may name projects, groups and ad-hoc groups; their
members become participants when the training starts and, with
``options.collections_each_round``, at every round start (members who joined the collection
meanwhile take part from that round on).

The rules are those of explicit participants: the collections belong to the training's
organisation, the creator can read them, and the actor holds a role (admin or coach) for every
member (``permissions.users_without_role``, the check of training creation). A member the actor
holds no role for when the collection is resolved again is left out (and logged).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import BadRequest, NotFound
from flplatform.orm import Collection, CollectionKind, Membership, Training, TrainingCollection, User
from flplatform.permissions import ANY_ROLE, Requester, can_read, users_without_role
from flplatform.trainings import participants

log = logging.getLogger(__name__)

KINDS = (CollectionKind.PROJECT, CollectionKind.GROUP, CollectionKind.ADHOC)


async def check_collections(
    requester: Requester, organization_id: uuid.UUID | None, ids: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    """The named collections, validated for a training of ``organization_id``; returns the ids of
    their current members (for the participant check of creation)."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return []
    session = requester.session
    found = {
        c.id: c
        for c in (await session.execute(select(Collection).where(Collection.id.in_(wanted)))).scalars()
    }
    for collection_id in wanted:
        collection = found.get(collection_id)
        if collection is None or not await can_read(requester, collection):
            raise NotFound(f"Collection {collection_id} not found.", code="collection_not_found")
        if collection.kind not in KINDS:
            raise BadRequest(
                "Only projects, groups and ad-hoc groups can name participants.", code="collection_kind"
            )
        if collection.organization_id != organization_id:
            raise BadRequest(
                f"Collection {collection_id} is not in the training's organisation.",
                code="collection_outside_organization",
            )
    return list(await member_ids(session, wanted))


async def member_ids(session: AsyncSession, collection_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    if not collection_ids:
        return set()
    rows = await session.execute(
        select(Membership.user_id).where(Membership.collection_id.in_(list(collection_ids))).distinct()
    )
    return set(rows.scalars())


async def attach(session: AsyncSession, training: Training, ids: Sequence[uuid.UUID]) -> None:
    wanted = list(dict.fromkeys(ids))
    if wanted:
        await session.execute(
            insert(TrainingCollection), [{"training_id": training.id, "collection_id": c} for c in wanted]
        )


async def collections_of(
    session: AsyncSession, training_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[uuid.UUID]]:
    out: dict[uuid.UUID, list[uuid.UUID]] = {t: [] for t in training_ids}
    if not training_ids:
        return out
    rows = await session.execute(
        select(TrainingCollection.training_id, TrainingCollection.collection_id)
        .where(TrainingCollection.training_id.in_(list(training_ids)))
        .order_by(TrainingCollection.collection_id)
    )
    for training_id, collection_id in rows:
        out[training_id].append(collection_id)
    return out


async def resolve(session: AsyncSession, training: Training) -> list[User]:
    """Add the current members of the training's collections who are not yet participants (and
    whom the actor may use); returns the users added."""
    collections = (await collections_of(session, [training.id]))[training.id]
    if not collections:
        return []
    present = await participants.ids(session, training.id)
    new_ids = await member_ids(session, collections) - present
    if not new_ids:
        return []
    users = list((await session.execute(select(User).where(User.id.in_(list(new_ids))))).scalars())
    users = [u for u in users if u.organization_id == training.organization_id and u.is_active]
    actor = await session.get(User, training.actor_id)
    if actor is None:
        return []
    refused = {u.id for u in await users_without_role(await Requester.load(session, actor), ANY_ROLE, users)}
    if refused:
        log.info(
            "training %s: the actor holds no role for collection members %s",
            training.id,
            sorted(map(str, refused)),
        )
    added = sorted((u for u in users if u.id not in refused), key=lambda u: (u.username, u.id))
    await participants.add(session, training.id, [u.id for u in added])
    return added
