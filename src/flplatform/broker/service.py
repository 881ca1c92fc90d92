"""Topic administration shared by the JSON API and the ``flplatform topic`` CLI.

Services flush, never commit. Callers tell the broker to drop its caches after the commit
(``Broker.invalidate``), so sockets see grant changes at once.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.broker.availability import STATUS_TEXT, availability
from flplatform.broker.core import Broker
from flplatform.broker.permissions import Perms, identity_of
from flplatform.broker.schemas import GrantRead, MessageRead, StatusRead, TopicDetail, TopicRead
from flplatform.broker.tables import DELIVERIES, MESSAGES, TOPICS
from flplatform.broker.topics import policy_for, topic_info
from flplatform.db import after_commit
from flplatform.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from flplatform.kit.pagination import paginate
from flplatform.orm import User
from flplatform.orm.broker import (
    BrokerTopic,
    BrokerTopicGrant,
    DispatchMode,
    ResponseTopic,
    StorePolicy,
)
from flplatform.permissions import Requester, can_read, can_update, readable


async def get_topic(session: AsyncSession, slug: str) -> BrokerTopic:
    topic = (await session.execute(select(BrokerTopic).where(BrokerTopic.slug == slug))).scalar_one_or_none()
    if topic is None:
        raise NotFound(f"Topic {slug} not found.")
    return topic


async def can_manage(requester: Requester, topic: BrokerTopic) -> bool:
    """Owner, the topic organisation's admins, superusers (``TOPIC_POLICY``)."""
    return await can_update(requester, topic)


async def require_manager(requester: Requester, topic: BrokerTopic) -> None:
    """404 for an organisation's topic the caller may not see (another organisation's, or one of
    theirs without a reason to see it), 403 for a visible one the caller does not manage."""
    if await can_manage(requester, topic):
        return
    if requester.is_anonymous:
        raise Unauthorized()
    if out_of_scope(requester, topic) or (
        topic.organization_id is not None and not await can_read(requester, topic)
    ):
        raise NotFound(f"Topic {topic.slug} not found.")
    raise Forbidden("Only the topic's owner, an organisation admin or a superuser may do this.")


def out_of_scope(requester: Requester, topic: BrokerTopic) -> bool:
    """A topic of an organisation the caller is not in (superusers are in every scope)."""
    return (
        topic.organization_id is not None
        and not requester.is_superuser
        and topic.organization_id != requester.organization_id
    )


async def topic_perms(broker: Broker, user: User | None, topic: BrokerTopic) -> Perms:
    """The DASF grants of ``user`` on ``topic`` (the sockets' rules, through the broker's cache)."""
    return await broker.perms_for(identity_of(user), topic_info(topic, broker.config))


async def require_visible(broker: Broker, requester: Requester, topic: BrokerTopic) -> Perms:
    """A topic of another organisation is 404 (401 for anonymous callers); inside the caller's
    scope the reference's rules (any permission on the topic) or ``TOPIC_POLICY`` let them see it."""
    if out_of_scope(requester, topic):
        raise Unauthorized() if requester.is_anonymous else NotFound(f"Topic {topic.slug} not found.")
    perms = await topic_perms(broker, requester.user, topic)
    if not (
        perms.produce
        or perms.consume
        or perms.view_status
        or await can_read(requester, topic)
        or await can_manage(requester, topic)
    ):
        if requester.is_anonymous:
            raise Unauthorized()
        if topic.organization_id is not None:  # objects one may not see are 404 in organisations
            raise NotFound(f"Topic {topic.slug} not found.")
        raise Forbidden("You may not view this topic.")
    return perms


async def require_pingable(broker: Broker, requester: Requester, topic: BrokerTopic) -> None:
    """Producers and managers ping; another organisation's topic is 404."""
    if out_of_scope(requester, topic):
        raise Unauthorized() if requester.is_anonymous else NotFound(f"Topic {topic.slug} not found.")
    perms = await topic_perms(broker, requester.user, topic)
    if not (perms.produce or await can_manage(requester, topic)):
        if requester.is_anonymous:
            raise Unauthorized()
        if topic.organization_id is not None and not (
            perms.consume or perms.view_status or await can_read(requester, topic)
        ):
            raise NotFound(f"Topic {topic.slug} not found.")
        raise Forbidden("You may not ping this topic.")


async def create_topic(
    session: AsyncSession,
    slug: str,
    owner: User | None,
    *,
    is_public: bool = False,
    anonymous_can_consume: bool = False,
    supports_dasf: bool = True,
    store_messages: StorePolicy | None = None,
    dispatch: DispatchMode = DispatchMode.BROADCAST,
) -> BrokerTopic:
    from flplatform.broker.envelope import STATUS_PING

    if slug == STATUS_PING:
        raise Conflict("The slug status-ping is reserved.")
    if (await session.execute(select(BrokerTopic.id).where(BrokerTopic.slug == slug))).first() is not None:
        raise Conflict(f"Topic {slug} already exists.")
    topic = BrokerTopic(
        slug=slug,
        owner_id=owner.id if owner else None,
        is_public=is_public,
        anonymous_can_consume=anonymous_can_consume,
        supports_dasf=supports_dasf,
        store_messages=store_messages,
        dispatch=dispatch,
        api_info={},
    )
    session.add(topic)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"Topic {slug} already exists.") from None
    if owner is not None:
        await set_grant(session, topic, owner, can_produce=True, can_consume=True, can_view_status=True)
    return topic


async def update_topic(session: AsyncSession, topic: BrokerTopic, changes: dict[str, Any]) -> BrokerTopic:
    """Apply a PATCH's fields (``None`` leaves a flag as it is; ``store_messages: None`` returns to
    the server default) and flush, so the answer and the caches see the new row."""
    for name in ("is_public", "anonymous_can_consume", "supports_dasf", "store_messages", "dispatch"):
        if name in changes:
            if name != "store_messages" and changes[name] is None:
                continue
            setattr(topic, name, changes[name])
    await session.flush()
    return topic


async def delete_topic(session: AsyncSession, topic: BrokerTopic) -> list[str]:
    """Delete a topic with its response topics (cascading to messages and grants); returns the slugs."""
    responses = (
        await session.execute(
            select(ResponseTopic.id, ResponseTopic.slug).where(ResponseTopic.is_response_for_id == topic.id)
        )
    ).all()
    ids = [r.id for r in responses] + [topic.id]
    await session.execute(delete(TOPICS).where(TOPICS.c.id.in_(ids)))
    session.expunge(topic)
    return [r.slug for r in responses] + [topic.slug]


async def find_user(session: AsyncSession, ref: str) -> User:
    """A user by id or username."""
    try:
        user_id = uuid.UUID(ref)
    except ValueError:
        user_id = None
    condition = or_(User.username == ref, User.id == user_id) if user_id else User.username == ref
    user = (await session.execute(select(User).where(condition))).scalar_one_or_none()
    if user is None:
        raise NotFound(f"User {ref} not found.")
    return user


async def set_grant(
    session: AsyncSession,
    topic: BrokerTopic,
    user: User,
    *,
    can_produce: bool | None = None,
    can_consume: bool | None = None,
    can_view_status: bool | None = None,
) -> BrokerTopicGrant:
    """Create or update a user's grant; None leaves a flag as it is. An organisation's topic is
    granted only to users of that organisation (nobody reads across organisations)."""
    if topic.organization_id is not None and user.organization_id != topic.organization_id:
        raise BadRequest(
            f"{user.username} is not in the topic's organisation; grants stay inside it.",
            code="grant_outside_organization",
        )
    grant = await session.get(BrokerTopicGrant, (topic.id, user.id))
    if grant is None:
        grant = BrokerTopicGrant(
            topic_id=topic.id, user_id=user.id, can_produce=False, can_consume=False, can_view_status=False
        )
        session.add(grant)
    if can_produce is not None:
        grant.can_produce = can_produce
    if can_consume is not None:
        grant.can_consume = can_consume
    if can_view_status is not None:
        grant.can_view_status = can_view_status
    await session.flush()
    return grant


async def revoke_grant(session: AsyncSession, topic: BrokerTopic, user: User) -> None:
    grant = await session.get(BrokerTopicGrant, (topic.id, user.id))
    if grant is None:
        raise NotFound(f"{user.username} holds no grant on {topic.slug}.")
    await session.delete(grant)
    await session.flush()


async def list_grants(
    session: AsyncSession, topic: BrokerTopic, *, limit: int | None = None, offset: int = 0
) -> list[tuple[BrokerTopicGrant, str]]:
    """The topic's grants with the grantees' usernames, by username (a page of them with ``limit``)."""
    stmt = (
        select(BrokerTopicGrant, User.username)
        .join(User, User.id == BrokerTopicGrant.user_id)
        .where(BrokerTopicGrant.topic_id == topic.id)
        .order_by(User.username, BrokerTopicGrant.user_id)
        .offset(offset)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [(g, name) for g, name in (await session.execute(stmt)).all()]


async def visible_topics(
    requester: Requester, *, responses: bool, limit: int, offset: int
) -> tuple[list[BrokerTopic], int]:
    """The topics the caller may see, by ``TOPIC_POLICY``'s clause (two statements: count, page)."""
    session = requester.session
    query = select(BrokerTopic).where(readable(requester, BrokerTopic))
    if not responses:
        query = query.where(BrokerTopic.kind == "topic")
    return await paginate(session, query, order_by=(BrokerTopic.slug,), limit=limit, offset=offset)


async def message_counts(
    session: AsyncSession, topic_ids: list[uuid.UUID]
) -> dict[uuid.UUID, tuple[int, int]]:
    """(pending, stored) per topic: pending = stored messages that nobody acknowledged."""
    if not topic_ids:
        return {}
    stored: dict[uuid.UUID, int] = dict(
        (
            await session.execute(
                select(MESSAGES.c.topic_id, func.count())
                .where(MESSAGES.c.topic_id.in_(topic_ids), MESSAGES.c.transient.is_(False))
                .group_by(MESSAGES.c.topic_id)
            )
        ).all()
    )
    acked = select(DELIVERIES.c.message_pk).where(DELIVERIES.c.message_pk == MESSAGES.c.id)
    pending: dict[uuid.UUID, int] = dict(
        (
            await session.execute(
                select(MESSAGES.c.topic_id, func.count())
                .where(MESSAGES.c.topic_id.in_(topic_ids), MESSAGES.c.transient.is_(False), ~acked.exists())
                .group_by(MESSAGES.c.topic_id)
            )
        ).all()
    )
    return {t: (pending.get(t, 0), stored.get(t, 0)) for t in topic_ids}


async def list_messages(
    session: AsyncSession, topic: BrokerTopic, *, limit: int, offset: int
) -> tuple[list[tuple[Any, list[str]]], int]:
    condition = (MESSAGES.c.topic_id == topic.id) & MESSAGES.c.transient.is_(False)
    total = (await session.execute(select(func.count()).select_from(MESSAGES).where(condition))).scalar_one()
    rows = (
        await session.execute(
            select(MESSAGES).where(condition).order_by(MESSAGES.c.id).limit(limit).offset(offset)
        )
    ).all()
    delivered: dict[int, list[str]] = {r.id: [] for r in rows}
    if rows:
        for pk, key in (
            await session.execute(
                select(DELIVERIES.c.message_pk, DELIVERIES.c.consumer_key)
                .where(DELIVERIES.c.message_pk.in_(list(delivered)))
                .order_by(DELIVERIES.c.delivered_at)
            )
        ).all():
            delivered[pk].append(key)
    return [(r, delivered[r.id]) for r in rows], total


async def get_message(session: AsyncSession, topic: BrokerTopic, ref: str) -> Any:
    """A stored message by its table id or its messageId."""
    condition = MESSAGES.c.topic_id == topic.id
    if ref.isdigit():
        condition = condition & (MESSAGES.c.id == int(ref))
    else:
        try:
            condition = condition & (MESSAGES.c.message_id == uuid.UUID(ref))
        except ValueError:
            raise NotFound(f"Message {ref} not found.") from None
    row = (await session.execute(select(MESSAGES).where(condition))).first()
    if row is None:
        raise NotFound(f"Message {ref} not found.")
    return row


# --------------------------------------------------------------------------- the HTTP API's views
# Topics are read fresh by the API: ``flush`` first writes the broker's pending touches
# (last_ping/last_pong) and acks, so the answer matches what this process knows.


async def fresh_topic(session: AsyncSession, broker: Broker, slug: str) -> BrokerTopic:
    """The topic with last_ping/last_pong as this process knows them (pending touches written)."""
    await broker.flush()
    return await get_topic(session, slug)


async def list_topic_reads(
    broker: Broker, requester: Requester, *, responses: bool, limit: int, offset: int, websocket_base: str
) -> tuple[list[TopicRead], int]:
    """A page of the topics the caller may see, as the API shows them, and the total."""
    await broker.flush()
    rows, total = await visible_topics(requester, responses=responses, limit=limit, offset=offset)
    return await topic_reads(requester.session, broker, rows, websocket_base), total


async def topic_reads(
    session: AsyncSession, broker: Broker, topics: list[BrokerTopic], websocket_base: str
) -> list[TopicRead]:
    return [TopicRead(**data) for data, _ in await _topic_fields(session, broker, topics, websocket_base)]


async def topic_detail(
    session: AsyncSession, broker: Broker, topic: BrokerTopic, websocket_base: str
) -> TopicDetail:
    [(data, api_info)] = await _topic_fields(session, broker, [topic], websocket_base)
    return TopicDetail(**data, api_info=api_info)


async def _topic_fields(
    session: AsyncSession, broker: Broker, topics: list[BrokerTopic], websocket_base: str
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each topic's ``TopicRead`` fields (settings, availability, counts, this process's
    sockets) and its api_info; ``websocket_base`` is the server's ``.../ws/`` URL."""
    counts = await message_counts(session, [t.id for t in topics])
    sources: dict[uuid.UUID, str] = {}
    source_ids = [t.is_response_for_id for t in topics if isinstance(t, ResponseTopic)]
    if source_ids:
        rows = await session.execute(
            select(BrokerTopic.id, BrokerTopic.slug).where(BrokerTopic.id.in_(source_ids))
        )
        sources = {r.id: r.slug for r in rows}
    now = broker.clock.now()
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for topic in topics:
        is_response = isinstance(topic, ResponseTopic)
        pending, stored = counts.get(topic.id, (0, 0))
        data: dict[str, Any] = {
            "id": topic.id,
            "slug": topic.slug,
            "is_response_topic": is_response,
            "is_response_for": sources.get(topic.is_response_for_id)
            if isinstance(topic, ResponseTopic)
            else None,
            "is_public": topic.is_public,
            "anonymous_can_consume": topic.anonymous_can_consume,
            "supports_dasf": topic.supports_dasf,
            "store_messages": topic.store_messages,
            "effective_store_messages": policy_for(topic.store_messages, is_response, broker.config),
            "dispatch": topic.dispatch,
            "owner_id": topic.owner_id,
            "created_at": topic.created_at,
            "last_ping": topic.last_ping,
            "last_pong": topic.last_pong,
            "availability": availability(topic.supports_dasf, topic.last_ping, topic.last_pong, now),
            "garbage_collect_on": topic.garbage_collect_on,
            "pending_count": pending,
            "stored_count": stored,
            "connected_consumers": broker.registry.count(topic.slug),
            "websocket_url": f"{websocket_base}{topic.slug}",
        }
        out.append((data, topic.api_info or {}))
    return out


def status_answer(broker: Broker, topic: BrokerTopic) -> tuple[int, str]:
    """The reference's plain-text status view: (HTTP status, text)."""
    if not topic.supports_dasf:
        return 400, "Topic is excluded from ping"
    return STATUS_TEXT[
        availability(topic.supports_dasf, topic.last_ping, topic.last_pong, broker.clock.now())
    ]


def topic_status(broker: Broker, topic: BrokerTopic) -> StatusRead:
    value = availability(topic.supports_dasf, topic.last_ping, topic.last_pong, broker.clock.now())
    text = STATUS_TEXT[value][1] if topic.supports_dasf else "Topic is excluded from ping"
    return StatusRead(
        slug=topic.slug, availability=value, status=text, last_ping=topic.last_ping, last_pong=topic.last_pong
    )


async def ping(broker: Broker, topic: BrokerTopic) -> None:
    """Ping the topic's consumer sockets in every process (a no-op for non-DASF topics)."""
    await broker.ping_topic(topic_info(topic, broker.config))


def grant_read(grant: BrokerTopicGrant, username: str) -> GrantRead:
    return GrantRead(
        user_id=grant.user_id,
        username=username,
        can_produce=grant.can_produce,
        can_consume=grant.can_consume,
        can_view_status=grant.can_view_status,
    )


async def grant_reads(
    session: AsyncSession, topic: BrokerTopic, *, limit: int, offset: int
) -> tuple[list[GrantRead], int]:
    """A page of the topic's grants and their total."""
    total = (
        await session.execute(
            select(func.count()).select_from(BrokerTopicGrant).where(BrokerTopicGrant.topic_id == topic.id)
        )
    ).scalar_one()
    rows = await list_grants(session, topic, limit=limit, offset=offset)
    return [grant_read(g, name) for g, name in rows], int(total)


async def message_reads(
    session: AsyncSession, broker: Broker, topic: BrokerTopic, *, limit: int, offset: int
) -> tuple[list[MessageRead], int]:
    """A page of the topic's stored messages with who acknowledged them, and the total."""
    await broker.flush()
    rows, total = await list_messages(session, topic, limit=limit, offset=offset)
    reads = [
        MessageRead(
            id=r.id,
            message_id=r.message_id,
            context=r.context,
            user_id=r.user_id,
            created_at=r.created_at,
            delivered_to=keys,
            content=json.loads(r.content),
        )
        for r, keys in rows
    ]
    return reads, total


async def resend_message(session: AsyncSession, broker: Broker, topic: BrokerTopic, ref: str) -> uuid.UUID:
    """Publish a stored message again to the topic's consumer sockets; returns its messageId."""
    row = await get_message(session, topic, ref)
    await broker.resend(topic_info(topic, broker.config), row.id, row.content)
    message_id: uuid.UUID = row.message_id
    return message_id


def invalidate_after_commit(session: AsyncSession, broker: Broker, slugs: list[str] | None) -> None:
    """Once the session commits, drop the broker's caches of ``slugs`` (None: every topic and
    grant) here and in the other processes, so sockets see the change at once."""

    async def _job() -> None:
        if slugs is None:
            await broker.invalidate(None)
        for slug in slugs or []:
            await broker.invalidate(slug)

    after_commit(session, _job)
