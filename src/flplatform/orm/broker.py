"""DASF message broker: topics, response topics, stored messages, deliveries and grants.

``BrokerTopic`` → ``ResponseTopic`` uses joined-table inheritance (the seed's Django
multi-table inheritance): a response topic shares the topic table and its unique slug.

Messages keep the forwarded envelope as JSON *text* (``content``): the broker never
re-serialises what it forwards, and the hot path writes it as-is. Their integer primary key
gives the delivery order per topic.

Per-consumer delivery tracking (the seed's ``delivered_to``) is keyed by a *consumer key*:
the user's id as a string, or ``"anonymous"`` for the anonymous identity (the seed used a
real AnonymousUser row for that).

Permissions: per-user grants in ``broker_topic_grants``; group grants plug in through
``flplatform.broker.permissions.GRANT_RESOLVERS`` when the permission layer lands.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from flplatform.orm.base import Base, IDMixin, TimestampMixin, str_enum, utcnow
from flplatform.orm.user import User

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigIntPK = BigInteger().with_variant(Integer, "sqlite")

ANONYMOUS_KEY = "anonymous"


class StorePolicy(enum.StrEnum):
    DISABLED = "disabled"
    CACHE = "cache"
    CACHEALL = "cacheall"
    STORE = "store"


class DispatchMode(enum.StrEnum):
    """``broadcast``: every consumer socket gets every message (the reference's behaviour).
    ``shared``: each message goes to one consumer socket (backends split the requests)."""

    BROADCAST = "broadcast"
    SHARED = "shared"


class BrokerTopic(IDMixin, TimestampMixin, Base):
    __tablename__ = "broker_topics"

    kind: Mapped[str] = mapped_column(String(16), index=True)
    slug: Mapped[str] = mapped_column(String(255), unique=True)
    is_public: Mapped[bool] = mapped_column(Boolean, default=False)
    # The anonymous identity may consume (the reference's ``--anonymous``: a grant to AnonymousUser).
    anonymous_can_consume: Mapped[bool] = mapped_column(Boolean, default=False)
    supports_dasf: Mapped[bool] = mapped_column(Boolean, default=True)
    # None: the server-wide default for source or response topics.
    store_messages: Mapped[StorePolicy | None] = mapped_column(str_enum(StorePolicy, "broker_store_policy"))
    dispatch: Mapped[DispatchMode] = mapped_column(
        str_enum(DispatchMode, "broker_dispatch_mode"), default=DispatchMode.BROADCAST
    )
    owner_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    # The tenant: the owner's organisation (a response topic: its source topic's); None for the
    # organisation-less space. Filled on insert by ``_fill_tenant`` below; kept when the owner
    # is deleted, so an orphaned topic never leaves its organisation.
    organization_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("collections.id"), index=True)
    last_ping: Mapped[dt.datetime | None]
    last_pong: Mapped[dt.datetime | None]
    garbage_collect_on: Mapped[dt.datetime | None] = mapped_column(index=True)
    api_info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    owner: Mapped[User | None] = relationship(lazy="raise")
    grants: Mapped[list[BrokerTopicGrant]] = relationship(
        back_populates="topic", lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )

    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "topic"}

    @property
    def is_response_topic(self) -> bool:
        return False


class ResponseTopic(BrokerTopic):
    """A one-off topic a requester listens on; created by the first publish that names it."""

    __tablename__ = "broker_response_topics"

    id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("broker_topics.id", ondelete="CASCADE"), primary_key=True
    )
    is_response_for_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("broker_topics.id", ondelete="CASCADE"), index=True
    )
    # The requester consumes; None is the anonymous identity, which is bound to the consumer
    # sockets that were already waiting on the slug when the topic was created.
    requester_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))

    is_response_for: Mapped[BrokerTopic] = relationship(foreign_keys=[is_response_for_id], lazy="raise")

    __mapper_args__ = {
        "polymorphic_identity": "response",
        "polymorphic_load": "inline",
        "inherit_condition": id == BrokerTopic.id,
    }

    @property
    def is_response_topic(self) -> bool:
        return True


class BrokerTopicGrant(Base):
    """Per-user object permissions on a topic (the seed's guardian permissions)."""

    __tablename__ = "broker_topic_grants"

    topic_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("broker_topics.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    can_produce: Mapped[bool] = mapped_column(Boolean, default=False)
    can_consume: Mapped[bool] = mapped_column(Boolean, default=False)
    can_view_status: Mapped[bool] = mapped_column(Boolean, default=False)

    topic: Mapped[BrokerTopic] = relationship(back_populates="grants", lazy="raise")
    user: Mapped[User] = relationship(lazy="raise")


class BrokerMessage(Base):
    __tablename__ = "broker_messages"
    __table_args__ = (
        UniqueConstraint("topic_id", "message_id"),
        Index("ix_broker_messages_topic_id_id", "topic_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    topic_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("broker_topics.id", ondelete="CASCADE"))
    message_id: Mapped[uuid.UUID]
    # properties.requestContext as an integer (None when absent).
    context: Mapped[int | None] = mapped_column(BigInteger)
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    # The envelope exactly as forwarded (JSON text).
    content: Mapped[str] = mapped_column(Text, deferred=True, deferred_raiseload=True)
    # Transient rows carry bodies too large for a PostgreSQL NOTIFY on topics that store
    # nothing; the sweeper removes them after a minute. They are never redelivered.
    transient: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class BrokerDelivery(Base):
    """``delivered_to``: which consumer identities have acknowledged a stored message."""

    __tablename__ = "broker_deliveries"

    message_pk: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("broker_messages.id", ondelete="CASCADE"),
        primary_key=True,
    )
    consumer_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    delivered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class BrokerSubscription(Base):
    """When a consumer identity first subscribed to a topic: with ``store``, a brand-new
    consumer gets the messages from that point on, not the whole history (unless it asks)."""

    __tablename__ = "broker_subscriptions"

    topic_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("broker_topics.id", ondelete="CASCADE"), primary_key=True
    )
    consumer_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Messages with a primary key above this are outstanding for the identity.
    after_message_pk: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


@event.listens_for(BrokerTopic, "before_insert", propagate=True)
def _fill_tenant(_mapper: Any, connection: Any, topic: BrokerTopic) -> None:
    """A response topic belongs to its source topic's organisation, a topic to its owner's."""
    if topic.organization_id is not None:
        return
    if isinstance(topic, ResponseTopic):
        source = select(BrokerTopic.organization_id).where(BrokerTopic.id == topic.is_response_for_id)
    elif topic.owner_id is not None:
        source = select(User.organization_id).where(User.id == topic.owner_id)
    else:
        return
    topic.organization_id = connection.execute(source).scalar()
