"""The broker's per-process topic cache and permission lookups.

A produced frame must not cost a query: topics are cached per process (``TopicInfo``, the
settings the hot path needs) for ``permission_cache_seconds``, and every socket caches its own
permission on its topic, stamped with ``grants_version``. ``forget`` drops the cached topics and
bumps the version, so every socket reloads its grant on its next message (the broker front calls
it on grant or topic changes, here and, through the bus, in the other processes).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.broker.config import BrokerConfig
from flplatform.broker.permissions import Identity, Perms, TopicInfo, resolve
from flplatform.orm.broker import (
    ANONYMOUS_KEY,
    BrokerTopic,
    BrokerTopicGrant,
    DispatchMode,
    ResponseTopic,
    StorePolicy,
)


def policy_for(store_messages: StorePolicy | None, is_response: bool, config: BrokerConfig) -> StorePolicy:
    """The store policy in force: the topic's own, else the server default for its kind."""
    if store_messages is not None:
        return StorePolicy(store_messages)
    default = config.store_response_messages if is_response else config.store_source_messages
    return default or config.store_messages


def topic_info(row: BrokerTopic, config: BrokerConfig) -> TopicInfo:
    is_response = isinstance(row, ResponseTopic)
    return TopicInfo(
        id=row.id,
        slug=row.slug,
        is_response=is_response,
        is_public=row.is_public,
        anonymous_can_consume=row.anonymous_can_consume,
        supports_dasf=row.supports_dasf,
        store_messages=row.store_messages,
        policy=policy_for(row.store_messages, is_response, config),
        dispatch=DispatchMode(row.dispatch or DispatchMode.BROADCAST),
        owner_id=row.owner_id,
        created_at=row.created_at,
        source_id=row.is_response_for_id if isinstance(row, ResponseTopic) else None,
        requester_id=row.requester_id if isinstance(row, ResponseTopic) else None,
    )


class TopicCache:
    """Topics by slug (``None`` cached too: unknown slugs are asked for again only after the TTL)
    and the permission resolution of an identity on a topic."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], config: BrokerConfig):
        self.sessionmaker = sessionmaker
        self.config = config
        self._topics: dict[str, tuple[TopicInfo | None, float]] = {}
        self.grants_version = 0

    async def get(self, slug: str, fresh: bool = False) -> TopicInfo | None:
        cached = self._topics.get(slug)
        if (
            not fresh
            and cached is not None
            and time.monotonic() - cached[1] < self.config.permission_cache_seconds
        ):
            return cached[0]
        async with self.sessionmaker() as session:
            row = (
                await session.execute(select(BrokerTopic).where(BrokerTopic.slug == slug))
            ).scalar_one_or_none()
            info = topic_info(row, self.config) if row is not None else None
        self._topics[slug] = (info, time.monotonic())
        return info

    async def get_by_id(self, topic_id: uuid.UUID) -> TopicInfo | None:
        for info, _ in self._topics.values():
            if info is not None and info.id == topic_id:
                return await self.get(info.slug)
        async with self.sessionmaker() as session:
            row = await session.get(BrokerTopic, topic_id)
            if row is None:
                return None
            slug = row.slug
        return await self.get(slug, fresh=True)

    def forget(self, slug: str | None = None) -> None:
        """Drop cached topic data and every socket's grant cache (this process only)."""
        if slug is None:
            self._topics.clear()
        else:
            self._topics.pop(slug, None)
        self.grants_version += 1

    async def perms_for(
        self, user: Identity, topic: TopicInfo, connected_at: dt.datetime | None = None
    ) -> Perms:
        source = await self.get_by_id(topic.source_id) if topic.source_id else None
        async with self.sessionmaker() as session:
            return await resolve(session, user, topic, source, connected_at)


async def consumer_keys(session: AsyncSession, topic: TopicInfo) -> list[str]:
    """The identities that must all acknowledge a ``cacheall`` message: holders of the
    ``can_consume`` grant, the anonymous identity when it may consume, and a response topic's
    requester."""
    keys = {
        str(uid)
        for uid in (
            await session.execute(
                select(BrokerTopicGrant.user_id).where(
                    and_(BrokerTopicGrant.topic_id == topic.id, BrokerTopicGrant.can_consume.is_(True))
                )
            )
        ).scalars()
    }
    if topic.anonymous_can_consume:
        keys.add(ANONYMOUS_KEY)
    if topic.is_response:
        keys.add(str(topic.requester_id) if topic.requester_id else ANONYMOUS_KEY)
    return sorted(keys)


__all__ = ["TopicCache", "consumer_keys", "policy_for", "topic_info"]
