"""Who may produce, consume or view the status of a topic.

Rules (dasf-protocol.md §1, with the reference's snapshot bug fixed):

* superusers may do everything;
* per-user grants (``broker_topic_grants``) give ``can_produce`` / ``can_consume`` / ``can_view_status``;
* ``is_public`` lets anyone publish and view the status (not consume);
* ``anonymous_can_consume`` lets anyone consume, the anonymous identity included;
* a response topic: its requester consumes; whoever may consume the *source* topic may produce
  (resolved live, so consumers added later can answer too); an anonymous requester's topic is
  bound to the anonymous consumer sockets that were already waiting on the slug when the topic
  was created, so other anonymous callers cannot read it by guessing the slug.

Group grants: the permission layer appends a resolver to ``GRANT_RESOLVERS``; each returns
extra ``Perms`` per topic id for a user, OR-ed into the per-user grants. Callers cache the
result per connection; ``Broker.invalidate_grants()`` drops every cache.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.orm.broker import ANONYMOUS_KEY, BrokerTopicGrant, DispatchMode, StorePolicy


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller of a socket or request: a user, or the anonymous identity (``id`` None)."""

    id: uuid.UUID | None = None
    username: str = "anonymous"
    is_superuser: bool = False

    @property
    def key(self) -> str:
        return str(self.id) if self.id is not None else ANONYMOUS_KEY

    @property
    def is_anonymous(self) -> bool:
        return self.id is None


ANONYMOUS = Identity()


def identity_of(user: Any) -> Identity:
    """The broker identity of an authenticated ``User`` (None: anonymous)."""
    if user is None:
        return Identity()
    return Identity(id=user.id, username=user.username, is_superuser=bool(user.is_superuser))


@dataclass(frozen=True, slots=True)
class Perms:
    produce: bool = False
    consume: bool = False
    view_status: bool = False

    def __or__(self, other: Perms) -> Perms:
        return Perms(
            self.produce or other.produce,
            self.consume or other.consume,
            self.view_status or other.view_status,
        )


ALL = Perms(True, True, True)
NONE = Perms()


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """What the hot path needs to know about a topic (cached per process)."""

    id: uuid.UUID
    slug: str
    is_response: bool
    is_public: bool
    anonymous_can_consume: bool
    supports_dasf: bool
    store_messages: StorePolicy | None
    policy: StorePolicy  # effective
    dispatch: DispatchMode
    owner_id: uuid.UUID | None
    created_at: dt.datetime
    source_id: uuid.UUID | None = None
    requester_id: uuid.UUID | None = None


GrantResolver = Callable[[AsyncSession, Identity, list[uuid.UUID]], Awaitable[dict[uuid.UUID, Perms]]]
GRANT_RESOLVERS: list[GrantResolver] = []


async def user_grants(
    session: AsyncSession, user: Identity, topic_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Perms]:
    ids = [t for t in topic_ids if t is not None]
    if user.id is None or not ids:
        return {}
    rows = (
        await session.execute(
            select(BrokerTopicGrant).where(
                BrokerTopicGrant.user_id == user.id, BrokerTopicGrant.topic_id.in_(ids)
            )
        )
    ).scalars()
    out = {r.topic_id: Perms(r.can_produce, r.can_consume, r.can_view_status) for r in rows}
    for resolver in GRANT_RESOLVERS:
        for topic_id, perms in (await resolver(session, user, ids)).items():
            out[topic_id] = out.get(topic_id, NONE) | perms
    return out


def _plain(topic: TopicInfo, grant: Perms) -> Perms:
    return grant | Perms(
        produce=topic.is_public, consume=topic.anonymous_can_consume, view_status=topic.is_public
    )


async def resolve(
    session: AsyncSession,
    user: Identity,
    topic: TopicInfo,
    source: TopicInfo | None = None,
    connected_at: dt.datetime | None = None,
) -> Perms:
    """The caller's permissions on ``topic``; ``connected_at`` is when the asking socket opened."""
    if user.is_superuser:
        return ALL
    grants = await user_grants(session, user, [topic.id] + ([source.id] if source else []))
    perms = _plain(topic, grants.get(topic.id, NONE))
    if topic.is_response:
        if user.id is not None and user.id == topic.requester_id:
            perms = perms | Perms(consume=True, view_status=True)
        elif user.id is None and topic.requester_id is None and connected_at is not None:
            if connected_at <= topic.created_at:
                perms = perms | Perms(consume=True)
        if source is not None and _plain(source, grants.get(source.id, NONE)).consume:
            perms = perms | Perms(produce=True, view_status=True)
    return perms
