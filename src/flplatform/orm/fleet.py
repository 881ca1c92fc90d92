"""Federations of many clients (issue 18): the collections a training draws participants from,
the recorded client selection of each round, and the clients' last heartbeats.

* ``training_collections``: groups, ad-hoc groups or projects named by a training; their members
  become participants when the training starts and, with ``options.collections_each_round``,
  at every round start.
* ``training_round_selections``: which participants a round asked (seeded sample of
  ``options.clients_per_round``, or every participant); ``dropped_at`` marks a selected client
  taken out of the round (offline past ``FLP_CLIENT_DROP_AFTER_SECONDS``). Who answered is the
  round's stored updates (``LocalModel`` rows), read beside it.
* ``client_heartbeats``: one row per client user, the last heartbeat received over HTTP; the
  broker's pongs on topics the user owns count as well (``BrokerTopic.last_pong``).
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from flplatform.orm.base import Base, UTCDateTime, utcnow


class TrainingCollection(Base):
    __tablename__ = "training_collections"

    training_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("trainings.id", ondelete="CASCADE"), primary_key=True
    )
    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    added_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RoundSelection(Base):
    """One selected client of one round (the round of the global model it was asked to train)."""

    __tablename__ = "training_round_selections"

    training_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("trainings.id", ondelete="CASCADE"), primary_key=True
    )
    round: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    selected_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    dropped_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    drop_reason: Mapped[str | None] = mapped_column(String(200))


class ClientHeartbeat(Base):
    __tablename__ = "client_heartbeats"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    source: Mapped[str] = mapped_column(String(16), default="http")
